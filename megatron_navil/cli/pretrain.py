"""navil-pretrain: the main training job.

torchrun --nproc_per_node N --no-python navil-pretrain ...
"""

from __future__ import annotations

import sys


def _main(argv) -> int:
    from megatron_navil.cli.args import parse_config
    from megatron_navil.config.base import ConfigError

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        e.same_on_every_rank = True  # every rank parses the same command line: reported once
        raise
    from megatron_navil.utils.cuda_env import ensure_max_connections

    # before the trainer creates the first CUDA context, which reads the variable
    ensure_max_connections(cfg.parallel.tensor_model_parallel_size)
    from megatron_navil.training.trainer import Trainer
    from megatron_navil.utils import lifetime

    # No process of the job outlives it: trainers die with torchrun, helpers with the trainer.
    lifetime.tie_to_launcher()
    lifetime.tie_helpers()
    return Trainer(cfg).train()


def main(argv=None) -> int:
    from megatron_navil.utils import cpu_compat
    from megatron_navil.utils.cli import run_cli
    from megatron_navil.utils.distributed import destroy

    cpu_compat.activate()  # on CPU, Megatron needs the layer; destroy turns it off
    return run_cli(_main, argv, cleanup=destroy)


if __name__ == "__main__":
    sys.exit(main())
