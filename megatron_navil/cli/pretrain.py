"""navil-pretrain: the main training job (torchrun --nproc_per_node N --no-python navil-pretrain ...)."""

from __future__ import annotations

import sys

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def _report(e: Exception, same_on_every_rank: bool) -> None:
    """Log a user error: once (rank 0) when every rank has the same one, else on each rank
    that has it, prefixed with its rank (it may be one rank's alone: a node-local path)."""
    from megatron_navil.utils.logging import global_rank

    if not same_on_every_rank or global_rank() == 0:
        log.error("%s", e)


def main(argv=None) -> int:
    from megatron_navil.cli.args import parse_config
    from megatron_navil.config.base import ConfigError
    from megatron_navil.training.checkpoint import CheckpointError

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        _report(e, same_on_every_rank=True)  # every rank parses the same command line
        return 2
    from megatron_navil.training.trainer import Trainer, TrainingStopped
    from megatron_navil.utils.distributed import destroy

    try:
        trainer = Trainer(cfg)
        code = trainer.train()
    except (ConfigError, CheckpointError, TrainingStopped) as e:
        _report(e, getattr(e, "same_on_every_rank", False))
        code = 2
    finally:
        destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
