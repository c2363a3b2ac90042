"""Optimizer state that loads at any parallel layout, EP and the optimizer kind included.

What the checkpoint stores per parameter (moments, fp32 master copy) is layout-free
(checkpoint/optimizer_keys.py). What Megatron keeps beside it is not: the chain of optimizers
(one when EP = 1, dense + expert when EP > 1), param groups keyed by that split, and, for the
plain optimizer, parameter indices in its own order. Loading that part from a checkpoint of
another layout fails (e.g. EP 1 -> 2). So on load the non-tensor part is always rebuilt from the
live optimizer, with the two values that are training state copied from the checkpoint:

- the Adam step count (bias correction), the same for every parameter;
- the fp16 loss scaler, when there is one.

Learning rate and weight decay in the param groups need nothing: the scheduler sets them from
its own state at every step.

A checkpoint of the plain fp32 optimizer has no master copies; the distributed one wants them.
For fp32 models the master copy IS the model weight, so it is filled from the loaded model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_navil.checkpoint.optimizer_keys import (
    MAIN_PARAM,
    canonical_key,
    request_leaves,
)
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class _Loaded:
    """Marks a place of the request the checkpoint fills (a tensor, object or factory)."""

    def __init__(self, key: str):
        self.key = key


@dataclass
class OptimizerTemplate:
    """The optimizer part of a load request, captured before the load."""

    structure: Any
    """The request with each leaf replaced by `_Loaded(key)` and everything else deep-copied:
    the live optimizer's own (fresh) non-tensor state, in its own layout."""
    model_weights: dict[str, torch.Tensor]
    """Model key -> the live parameter (for master copies a checkpoint lacks)."""


def capture(optimizer_request: Any, model_request: dict) -> OptimizerTemplate:
    """Take the template before dist_checkpointing consumes the request."""
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedBase,
        ShardedTensorFactory,
    )

    def walk(x):
        if isinstance(x, (ShardedBase, ShardedTensorFactory)):
            return _Loaded(x.key)
        if isinstance(x, LocalNonpersistentObject):  # this rank's own value, never stored
            return copy.deepcopy(x.unwrap())
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return copy.deepcopy(x)

    weights = {leaf.key: leaf.data for leaf in request_leaves(model_request)}
    return OptimizerTemplate(walk(optimizer_request), weights)


def master_copy_is_model_weight(dtype: torch.dtype):
    """`optional` predicate for checkpoint.load: with fp32 parameters a missing master copy can
    be taken from the model weight (it is the same tensor); otherwise it must be stored."""

    def optional(key: str) -> bool:
        return dtype == torch.float32 and canonical_key(key).startswith(MAIN_PARAM)

    return optional


def rebuild(template: OptimizerTemplate, loaded: Any) -> Any:
    """The state dict to give `optimizer.load_state_dict`: the template's structure, the loaded
    tensors where it has leaves, and the checkpoint's step and loss scaler."""
    step = _saved_step(loaded)
    scaler = _first(loaded, "grad_scaler")

    def fill(t, got):
        if isinstance(t, _Loaded):
            if got is not None:
                return got
            name = canonical_key(t.key)
            if name.startswith(MAIN_PARAM):  # optional master copy: the loaded model weight
                return template.model_weights[name[len(MAIN_PARAM) :]].detach().clone()
            raise KeyError(f"checkpoint returned no value for {t.key}")
        if isinstance(t, dict):
            got = got if isinstance(got, dict) else {}
            return {k: fill(v, got.get(k)) for k, v in t.items()}
        if isinstance(t, list):
            got = got if isinstance(got, (list, dict)) else []
            return [fill(v, _item(got, i)) for i, v in enumerate(t)]
        return t

    out = fill(template.structure, loaded)
    if step is None:
        log.warning("the checkpoint's optimizer state has no step count: Adam restarts at 0")
    else:
        _set_steps(out, step)
    if scaler is not None:
        _set_all(out, "grad_scaler", scaler)
    return out


def _item(seq, i):
    if isinstance(seq, dict):
        return seq.get(i)
    return seq[i] if i < len(seq) else None


def _walk_dicts(x):
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from _walk_dicts(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _walk_dicts(v)


def _as_number(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _saved_step(loaded: Any) -> Optional[float]:
    """The step count the checkpoint's optimizers stored: in their param groups (distributed
    optimizer, TE/apex Adam), or as the plain optimizer's `state.common_step` (torch Adam keeps
    it per parameter; Megatron stores one)."""
    steps = set()
    for d in _walk_dicts(loaded):
        groups = d.get("param_groups")
        for g in groups if isinstance(groups, list) else []:
            if isinstance(g, dict) and g.get("step") is not None:
                steps.add(_as_number(g["step"]))
        state = d.get("state")
        if isinstance(state, dict) and state.get("common_step") is not None:
            steps.add(_as_number(state["common_step"]))
    if not steps:
        return None
    if len(steps) > 1:  # Megatron keeps chained optimizers in step; take the furthest
        log.warning("the checkpoint's optimizers disagree on the step count %s", sorted(steps))
    return max(steps)


def _set_steps(state: Any, step: float) -> None:
    """Put `step` where each optimizer of the rebuilt state keeps it."""
    for d in _walk_dicts(state):
        groups = d.get("param_groups")
        if not isinstance(groups, list):
            continue
        with_step = [g for g in groups if isinstance(g, dict) and "step" in g]
        for g in with_step:
            g["step"] = _like(g["step"], step)
        per_param = d.get("state")
        if not with_step and isinstance(per_param, dict):
            # A plain optimizer's torch state dict: Megatron restores every parameter's step from
            # `common_step` (saved only when nonzero, so a fresh optimizer may lack it).
            per_param["common_step"] = torch.tensor(step, dtype=torch.float32)


def _like(old, value: float):
    if torch.is_tensor(old):
        return torch.tensor(value, dtype=old.dtype, device=old.device)
    return type(old)(value) if isinstance(old, (int, float)) else value


def _first(state: Any, key: str):
    for d in _walk_dicts(state):
        if d.get(key) is not None:
            return d[key]
    return None


def _set_all(state: Any, key: str, value) -> None:
    for d in _walk_dicts(state):
        if key in d:
            d[key] = copy.deepcopy(value)
