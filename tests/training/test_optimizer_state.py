"""The layout-free optimizer checkpoint, piece by piece (no processes; the end-to-end proof is
tests/training/test_reshard_chain.py).

- `canonical_key`: the chained-optimizer prefix of older EP > 1 checkpoints and the plain
  optimizer's `fp32_param` spelling map onto one name per tensor; model keys are untouched.
- `match_stored_keys`: request leaves (tensors and the gated-fc1 tensor factory) are renamed to
  the spelling a checkpoint stores, and left alone when the tensor is truly absent, so the
  missing-key refusal still names them.
- `rebuild`: the live optimizer's own structure is kept, loaded tensors go where it has leaves,
  and the checkpoint's step count reaches every place an optimizer keeps it (param groups of the
  distributed optimizer, `common_step` of the plain one), whatever structure the checkpoint had.
  A master copy the checkpoint lacks is taken from the loaded model weight.
Where to look: megatron_navil/checkpoint/optimizer_keys.py, training/optimizer_state.py.
"""

import torch
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedTensor,
    ShardedTensorFactory,
)

from megatron_navil.checkpoint.optimizer_keys import (
    MAIN_PARAM,
    canonical_key,
    leaf_keys,
    match_stored_keys,
)
from megatron_navil.training import optimizer_state


def _tensor(key: str, n: int = 4) -> ShardedTensor:
    return ShardedTensor.from_rank_offsets(key, torch.zeros(n))


def _gated(key: str) -> ShardedTensorFactory:
    """A factory that stores one tensor as `<key>_w` and `<key>_v` (Megatron's SwiGLU fc1)."""

    def build(k, t, replica_id, flattened_range):
        w, v = torch.chunk(t, 2)
        return {"w": _tensor(f"{k}_w", w.numel()), "v": _tensor(f"{k}_v", v.numel())}

    return ShardedTensorFactory(key, torch.zeros(8), build, lambda parts: parts, 0)


def test_canonical_key():
    k = "language_model.decoder.layers.0.mlp.experts.experts.1.linear_fc2.weight"
    assert canonical_key(f"chained_1.optimizer.state.exp_avg.{k}") == f"optimizer.state.exp_avg.{k}"
    assert canonical_key(f"optimizer.state.fp32_param.{k}") == f"{MAIN_PARAM}{k}"
    assert canonical_key(f"chained_0.optimizer.state.fp32_param.{k}") == f"{MAIN_PARAM}{k}"
    assert canonical_key(k) == k


def test_match_stored_keys_renames_only_other_spellings():
    fc1 = "decoder.layers.0.mlp.experts.experts.0.linear_fc1.weight"
    request = {
        "a": _tensor("optimizer.state.exp_avg.x.weight"),  # stored with a chained prefix
        "b": _tensor("optimizer.state.param.x.weight"),  # stored as fp32_param
        "c": _gated(f"optimizer.state.exp_avg_sq.{fc1}"),  # factory, stored with a prefix
        "d": _tensor("optimizer.state.exp_avg.y.weight"),  # stored as is
        "e": _tensor("optimizer.state.exp_avg.gone.weight"),  # not stored at all
    }
    stored = {
        "chained_1.optimizer.state.exp_avg.x.weight",
        "chained_0.optimizer.state.fp32_param.x.weight",
        f"chained_1.optimizer.state.exp_avg_sq.{fc1}_w",
        f"chained_1.optimizer.state.exp_avg_sq.{fc1}_v",
        "optimizer.state.exp_avg.y.weight",
    }
    assert match_stored_keys(request, stored) == 3
    assert request["a"].key == "chained_1.optimizer.state.exp_avg.x.weight"
    assert request["b"].key == "chained_0.optimizer.state.fp32_param.x.weight"
    assert leaf_keys(request["c"]) == [
        f"chained_1.optimizer.state.exp_avg_sq.{fc1}_w",
        f"chained_1.optimizer.state.exp_avg_sq.{fc1}_v",
    ]
    assert request["d"].key == "optimizer.state.exp_avg.y.weight"
    assert request["e"].key == "optimizer.state.exp_avg.gone.weight"  # reported as missing


def _distributed_request(step):
    """The shape of a DistributedOptimizer's request: param groups with the step, tensors per
    parameter index."""
    return {
        "optimizer": {"param_groups": [{"lr_mult": 1.0, "step": step}, {"step": step}]},
        "param_state_sharding_type": "fully_reshardable",
        "param_state": {
            0: {
                "param": _tensor(f"{MAIN_PARAM}w"),
                "exp_avg": _tensor("optimizer.state.exp_avg.w"),
            }
        },
    }


def test_rebuild_keeps_the_live_structure_and_takes_the_saved_step():
    # Live: two chained optimizers (EP > 1): one distributed, one plain torch-Adam state dict.
    live = {
        0: _distributed_request(0.0),
        1: {
            "state": {3: {"exp_avg": _tensor("optimizer.state.exp_avg.e")}},
            "param_groups": [{"params": LocalNonpersistentObject([3]), "lr": 0.1}],
        },
    }
    weight = torch.arange(4.0)
    template = optimizer_state.capture(
        live, {"model": {"w": ShardedTensor.from_rank_offsets("w", weight)}}
    )

    # Saved by a single optimizer (EP = 1) at step 7, merged with the tensors loaded into the
    # live request's places; the master copy of `w` was not in the checkpoint.
    loaded = {
        "optimizer": {"param_groups": [{"lr_mult": 1.0, "step": 7.0}]},
        "param_state_sharding_type": "fully_reshardable",
        0: {"param_state": {0: {"exp_avg": torch.ones(4)}}},
        1: {"state": {3: {"exp_avg": torch.full((4,), 2.0)}}},
    }
    out = optimizer_state.rebuild(template, loaded)

    assert set(out) == {0, 1}
    assert [g["step"] for g in out[0]["optimizer"]["param_groups"]] == [7.0, 7.0]
    assert torch.equal(out[0]["param_state"][0]["exp_avg"], torch.ones(4))
    assert torch.equal(out[0]["param_state"][0]["param"], weight)  # from the model weight
    assert out[0]["param_state"][0]["param"] is not weight  # a copy, not the live parameter
    assert out[1]["param_groups"] == [{"params": [3], "lr": 0.1}]  # live indices, unwrapped
    assert out[1]["state"]["common_step"].item() == 7.0
    assert torch.equal(out[1]["state"][3]["exp_avg"], torch.full((4,), 2.0))


def test_saved_step_of_a_plain_optimizer():
    template = optimizer_state.capture(_distributed_request(0.0), {})
    loaded = {"optimizer": {"state": {"common_step": torch.tensor(5.0)}, "param_groups": [{}]}}
    loaded.update({"param_state": {0: {"param": torch.zeros(4), "exp_avg": torch.zeros(4)}}})
    out = optimizer_state.rebuild(template, loaded)
    assert [g["step"] for g in out["optimizer"]["param_groups"]] == [5.0, 5.0]


def test_master_copy_is_optional_only_for_fp32():
    fp32 = optimizer_state.master_copy_is_model_weight(torch.float32)
    bf16 = optimizer_state.master_copy_is_model_weight(torch.bfloat16)
    assert fp32(f"{MAIN_PARAM}w") and fp32("chained_0.optimizer.state.fp32_param.w")
    assert not fp32("optimizer.state.exp_avg.w")
    assert not bf16(f"{MAIN_PARAM}w")
