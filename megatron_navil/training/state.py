"""The full training state as one sharded state dict (dist_checkpointing), and its restore.

model / model{i}   model chunks (layout-free: loads at any TP/PP/EP)
optimizer          Megatron optimizer state, one tensor per parameter and kind ("fully_reshardable"
                   for the distributed optimizer), so it loads at any TP/PP/EP/DP layout and
                   with either optimizer kind; its non-tensor part is rebuilt on load
                   (training/optimizer_state.py)
scheduler          LR/WD scheduler (common)
train              step, consumed samples/tokens, skipped counters (common)
data               the data loader's resume state as a JSON string (common: the loader plans
                   globally; JSON so no loader state is ever unpickled)
rng_state          per-rank RNG states (python, numpy, torch, Megatron's tracker); restored
                   only when the layout (world size) is unchanged, else re-seeded
"""

from __future__ import annotations

import json
import random
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_navil.checkpoint import load_model_state, model_sharded_state_dict
from megatron_navil.checkpoint.optimizer_keys import OPTIMIZER_SHARDING
from megatron_navil.training import optimizer_state


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
        state["data"] = json.dumps(data)
    if include_rng:
        world, rank = _world()
        state["rng_state"] = ShardedObject(
            "rng_state", rng_state(), (world,), (rank,), replica_id=0
        )
    return state


def capture_optimizer_template(request: dict) -> Optional[optimizer_state.OptimizerTemplate]:
    """Before loading `request` (train_sharded_state(..., is_loading=True)): what `restore`
    needs to rebuild the optimizer's non-tensor state in this run's layout."""
    if "optimizer" not in request:
        return None
    model = {k: v for k, v in request.items() if k.startswith("model")}
    return optimizer_state.capture(request["optimizer"], model)


def loaded_data_state(loaded: dict) -> dict:
    """The loader state of a loaded train state (JSON; checkpoints before 2026-12 hold a dict)."""
    data = loaded["data"]
    return json.loads(data) if isinstance(data, str) else data


def restore(
    loaded: dict,
    chunks: list,
    optimizer,
    scheduler,
    template: Optional[optimizer_state.OptimizerTemplate] = None,
) -> None:
    """Put a loaded train state (from checkpoint.load) back into the live objects. The model
    goes first: a master copy the checkpoint lacks is taken from the loaded weights."""
    load_model_state(loaded, chunks)
    if optimizer is not None and template is not None:
        from megatron_navil.training.optimizer import unshare_adam_steps

        optimizer.load_state_dict(optimizer_state.rebuild(template, loaded.get("optimizer")))
        unshare_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
