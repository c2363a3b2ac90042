"""Process-group set-up shared by the trainer, the tests and the tools.

gloo on CPU (with the CPU compatibility layer), NCCL on GPU. Megatron-Core's model-parallel
groups come from `parallel_state.initialize_model_parallel`; seeds are set the way Megatron-LM
does plus the CPU generator, which CPU initialisation draws from (see utils/cpu_compat.py).
`initialize_model_parallel` turns the CPU compatibility layer on where it is needed (Megatron's
RNG tracker and everything built after it need it on CPU) and `destroy` turns it off: the
layer lives exactly as long as Megatron's groups unless an entry point turned it on earlier.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Callable, Optional

import numpy as np
import torch

from megatron_navil.config.base import ConfigError
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.utils import cpu_compat
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def is_rank0() -> bool:
    """Global rank 0 of the initialised world (True outside a distributed job)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when `flag` is True on any (False outside a job)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """World barrier; a no-op outside a distributed job."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def init_process_group(timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed from the launcher's env (torchrun / SLURM) if needed."""
    if torch.distributed.is_initialized():
        return
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if key not in os.environ and f"SLURM_{_SLURM_NAMES[key]}" in os.environ:
            os.environ[key] = os.environ[f"SLURM_{_SLURM_NAMES[key]}"]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "gloo" if cpu_compat.needed() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )


_SLURM_NAMES = {"RANK": "PROCID", "WORLD_SIZE": "NTASKS", "LOCAL_RANK": "LOCALID"}


def data_parallel_size(parallel: ParallelConfig, world: int) -> int:
    """DP size of `parallel` on `world` processes; ConfigError when Megatron's group set-up would
    refuse the combination (world not a multiple of TP x PP, EP not dividing DP). The one
    check the trainer and the scaling planner share."""
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by TP x PP = {model_parallel}; launch a "
            "multiple of that many processes or change the parallel sizes",
            same_on_every_rank=True,
        )
    dp = world // model_parallel
    # Megatron's expert groups are TP x EP x PP ranks (expert TP = TP), so EP must divide DP;
    # parallel_state.initialize_model_parallel raises a RuntimeError otherwise.
    if dp % parallel.expert_model_parallel_size:
        raise ConfigError(
            f"expert parallel size {parallel.expert_model_parallel_size} must divide the "
            f"data-parallel size {dp} (world {world} / TP x PP {model_parallel}): Megatron "
            "places the experts on TP x EP x PP ranks",
            same_on_every_rank=True,
        )
    return dp


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Create Megatron's TP/PP/EP/DP groups and seed every RNG that matters."""
    from megatron.core import parallel_state, tensor_parallel

    # Before anything of Megatron runs: its RNG tracker (seeded below), schedules and layers
    # need the CPU layer on a machine without CUDA (a no-op with CUDA, or when already on).
    cpu_compat.activate()
    init_process_group()
    world = torch.distributed.get_world_size()
    dp = data_parallel_size(parallel, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # CPU initialisation draws from the CPU generator: identical on every rank so replicated
    # parameters agree across TP ranks (model_parallel_cuda_manual_seed reseeds it on CPU).
    torch.manual_seed(seed)
    log.info(
        "model parallel: TP=%d PP=%d EP=%d DP=%d (world %d, %s)",
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
        dp,
        world,
        "gloo/CPU" if cpu_compat.needed() else "nccl/GPU",
    )


# What torch.distributed says when a peer process is gone (gloo / NCCL / the TCP store).
_LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Socket Timeout",
    "recvValue failed",
)


def lost_peer(e: BaseException) -> Optional[str]:
    """The first line of `e` when it says a peer process of the job died or became unreachable
    (then this rank cannot go on), else None."""
    text = str(e)
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(e, dist_error) or any(s in text for s in _LOST_PEER):
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return first[:200]
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def teardown_if_new() -> Callable[[], None]:
    """A cleanup for a console script's `main`: it destroys the process group (and with it the
    CPU compatibility layer, see `destroy`) only when none existed at the time of this call, so a
    script called in-process (tests, notebooks) never tears down state its caller owns."""
    owned_by_caller = torch.distributed.is_initialized()
    return (lambda: None) if owned_by_caller else destroy


def destroy() -> None:
    """Tear down Megatron's groups, the process group and the CPU compatibility layer."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    cpu_compat.deactivate()
