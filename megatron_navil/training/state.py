"""The full training state as one sharded state dict (dist_checkpointing), and its restore.

model / model{i}   model chunks (layout-free: loads at any TP/PP/EP)
optimizer          Megatron optimizer state, "fully_reshardable" for the distributed
                   optimizer so it also loads at another TP/PP/DP layout
scheduler          LR/WD scheduler (common)
train              step, consumed samples/tokens, skipped counters (common)
data               the data loader's resume state (common: the loader plans globally)
rng_state          per-rank RNG states (python, numpy, torch, Megatron's tracker); restored
                   only when the layout (world size) is unchanged, else re-seeded
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_navil.checkpoint import (
    SHARDING_METADATA,
    load_model_state,
    model_sharded_state_dict,
)

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", **SHARDING_METADATA}


def rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def train_sharded_state(
    chunks: list,
    optimizer,
    scheduler,
    *,
    train: Optional[dict] = None,
    data: Any = None,
    is_loading: bool = False,
    include_rng: bool = True,
) -> dict:
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=OPTIMIZER_SHARDING
        )
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if train is not None:
        state["train"] = train
    if data is not None:
        state["data"] = data
    if include_rng:
        world, rank = _world()
        state["rng_state"] = ShardedObject(
            "rng_state", rng_state(), (world,), (rank,), replica_id=0
        )
    return state


def restore(loaded: dict, chunks: list, optimizer, scheduler) -> None:
    """Put a loaded train state (from checkpoint.load) back into the live objects."""
    load_model_state(loaded, chunks)
    if optimizer is not None and "optimizer" in loaded:
        from megatron_navil.training.optimizer import unshare_adam_steps

        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
