"""How model state is keyed inside a torch_dist checkpoint.

A Megatron dist checkpoint stores GLOBAL tensors, so a checkpoint written at one TP/PP/EP layout
loads at any other. Ours keep one key per parameter, per layer and per expert
(`SHARDING_METADATA`; `...decoder.layers.3.mlp.experts.experts.1.linear_fc2.weight`) instead of
Megatron's default of stacking layers and experts along extra axes: a training stage that
freezes some experts (e.g. the text FFN) then saves optimizer state for exactly the trained
ones, and the HF conversion reads parameters one by one. Gated `linear_fc1` weights are two
keys, `_w` (gate) and `_v` (up). The sharded state dict holds `model` (or `model0`, `model1`,
... with virtual pipeline stages).

- `model_sharded_state_dict` / `load_model_state`: the model part of what training saves.
- `sharded_location(name)` / `stored_parts(keys, name)`: canonical parameter name
  (TP=1/PP=1/EP=1 local-backend `state_dict` key) -> its storage key(s), for readers that need
  no model and no process group (a trainer exports from rank 0 alone).
- `CanonicalLayout` / `SlotView`: the exact tensors Megatron saves for the canonical model
  (built by conversion/layout.canonical_sharded_layout from a meta-device model), which the
  streaming writer (dist_io) follows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SHARDING_METADATA = {"singleton_local_shards": True}

EXTRA_STATE = "_extra_state"
"""Key suffix of Transformer Engine's per-module metadata (FP8 scales and amax history)."""

_EXPERT_PATH = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def model_chunks(chunks: list) -> list[tuple[str, torch.nn.Module]]:
    """(state key, unwrapped module) per model chunk: `model`, or `model0..` with virtual PP."""
    unwrap = [c.module if hasattr(c, "module") else c for c in chunks]
    if len(unwrap) == 1:
        return [("model", unwrap[0])]
    return [(f"model{i}", c) for i, c in enumerate(unwrap)]


def model_sharded_state_dict(chunks: list) -> dict:
    return {
        k: c.sharded_state_dict(metadata=dict(SHARDING_METADATA)) for k, c in model_chunks(chunks)
    }


def load_model_state(loaded: dict, chunks: list) -> None:
    """Copy the model entries of a loaded state (checkpoint.load) into `chunks`."""
    for key, chunk in model_chunks(chunks):
        chunk.load_state_dict(loaded[key], strict=False)


def sharded_location(name: str) -> str:
    """Canonical parameter name -> its torch_dist key (only the experts' module path differs,
    `local_experts.{e}` -> `experts.{e}`). A gated `linear_fc1` is stored as two keys,
    `<key>_w` (gate) and `<key>_v` (up): see `stored_parts`."""
    return _EXPERT_PATH.sub(r".mlp.experts.experts.\1.", name)


def stored_parts(keys, name: str) -> list[str]:
    """The stored key(s) of canonical parameter `name`, concatenated along dim 0 in this order."""
    key = sharded_location(name)
    if key in keys:
        return [key]
    if f"{key}_w" in keys and f"{key}_v" in keys:
        return [f"{key}_w", f"{key}_v"]
    return [key]  # missing: the caller names it


@dataclass
class SlotView:
    """How one ShardedTensor's data is cut from its canonical parameter (a strided view)."""

    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class CanonicalLayout:
    """What Megatron saves for the canonical model: tensors (with the parameter each is a view
    of) and objects (`_extra_state` of linear layers, grouped by unique key)."""

    tensors: list  # [ShardedTensor]
    views: list[SlotView]
    objects: dict[str, list]  # unique_key -> [ShardedObject]
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
