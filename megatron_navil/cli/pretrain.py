"""navil-pretrain: the main training job (torchrun --nproc_per_node N --no-python navil-pretrain ...)."""

from __future__ import annotations

import sys

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def main(argv=None) -> int:
    from megatron_navil.cli.args import parse_config
    from megatron_navil.config.base import ConfigError
    from megatron_navil.training.checkpoint import CheckpointError

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    from megatron_navil.training.trainer import Trainer, TrainingStopped
    from megatron_navil.utils.distributed import destroy

    try:
        trainer = Trainer(cfg)
        code = trainer.train()
    except (ConfigError, CheckpointError, TrainingStopped) as e:
        log.error("%s", e)  # once per rank, prefixed with the rank (it may be one rank's alone)
        code = 2
    finally:
        destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
