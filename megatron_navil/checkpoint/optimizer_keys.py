"""How optimizer state is keyed in a checkpoint, so it loads at any parallel layout.

Megatron's optimizers store one tensor per model parameter and state kind
(`optimizer.state.exp_avg.<model key>`): the distributed optimizer in its `fully_reshardable`
format, the plain one always. Two things would still tie a checkpoint to its layout, and both
are handled here:

- Megatron builds one optimizer for dense and one for expert-parallel parameters when EP > 1,
  but a single one when EP = 1, and by default prefixes every key of a chained optimizer with
  `chained_<i>.`. We save without the prefix (`chained_optim_avoid_prefix`, in
  `OPTIMIZER_SHARDING`), so keys are the same whatever the chain; checkpoints written with the
  prefix (EP = 2 before this) are matched by stripping it.
- The fp32 master copy is `param` for the distributed optimizer and `fp32_param` for the plain
  mixed-precision one: the same tensor under two names.

`match_stored_keys` renames the leaves of a load request to the names the checkpoint uses for
the same tensor. The non-tensor part of the optimizer state (param groups, chain structure) is
layout-dependent and is rebuilt from the live optimizer at load (training/optimizer_state.py).
"""

from __future__ import annotations

import re

from megatron_navil.checkpoint.keys import SHARDING_METADATA

OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    **SHARDING_METADATA,
}
"""`metadata` of every optimizer.sharded_state_dict call (save and load).

NOTE: `fully_reshardable` all-gathers each DP group's optimizer state onto all of its ranks at
every save (issue 11). The fully sharded alternatives do not fit in Megatron-Core 0.16.1:
`fully_sharded_model_space` refuses to save ("ShardedTensor.flattened_range is not supported",
tried on the debug model), and `dp_reshardable` reshards only along DP (no TP/PP/EP change, no
switch between optimizer kinds). `distrib_optim_fully_reshardable_mem_efficient` gathers onto DP
rank 0 only, but over gloo (CPU) and with the write serialised there: not clearly faster, and
unmeasured; left off."""

MAIN_PARAM = "optimizer.state.param."
"""Key prefix of the optimizer's fp32 master copy of a parameter (canonical spelling)."""

_CHAINED = re.compile(r"^chained_\d+\.")
_ALIASES = (("optimizer.state.fp32_param.", MAIN_PARAM),)


def canonical_key(key: str) -> str:
    """The layout-free name of a stored optimizer tensor (model keys are returned unchanged)."""
    key = _CHAINED.sub("", key)
    for alias, name in _ALIASES:
        if key.startswith(alias):
            return name + key[len(alias) :]
    return key


def leaf_keys(leaf) -> list[str]:
    """The storage keys of one request leaf: a ShardedTensor or ShardedObject has its own key, a
    ShardedTensorFactory (e.g. the gated fc1 weight, stored as `_w` and `_v`) those it builds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(leaf, ShardedTensorFactory):
        return [x.key for x in nested_values(leaf.build())]
    return [leaf.key]


def request_leaves(state: dict) -> list:
    """Every leaf of a load request (tensors, objects and tensor factories)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    return [x for x in nested_values(state) if isinstance(x, (ShardedBase, ShardedTensorFactory))]


def match_stored_keys(state: dict, stored: set[str]) -> int:
    """Rename, in place, every leaf of `state` whose keys `stored` lacks but holds under another
    spelling of the same tensor (see the module docstring). Returns how many were renamed."""
    by_canonical = {canonical_key(k): k for k in stored}
    renamed = 0
    for leaf in request_leaves(state):
        keys = leaf_keys(leaf)
        if all(k in stored for k in keys):
            continue
        targets = [by_canonical.get(canonical_key(k)) for k in keys]
        if None in targets:
            continue  # truly absent: the caller reports it
        # A factory's built keys extend its base key by a suffix (`_w`, `_v`); only the prefix
        # of the name differs between spellings, so the suffix carries over.
        old = leaf.key
        suffix = len(keys[0]) - len(old)
        leaf.key = targets[0][: len(targets[0]) - suffix]
        if leaf_keys(leaf) != targets:  # not a pure prefix change: leave it to be reported
            leaf.key = old
            continue
        renamed += 1
    return renamed
