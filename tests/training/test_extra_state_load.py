"""Checkpoints load across backends: Transformer Engine's `_extra_state` may be missing, nothing
else may.

TE norms and linears put an `_extra_state` entry (FP8 scales, amax history) into their state
dict; Megatron's `make_sharded_tensors_for_checkpoint` turns it into a ShardedObject that the TE
model requests on load. Checkpoints of the local backend and of navil-convert have none. This
CPU test gives the model's norms exactly that property (a norm with get/set_extra_state, built
through the same backend slot TE's norm fills) and proves:
- a local-backend checkpoint loads into such a model: every weight bit-identical, no error;
- the reverse (a checkpoint WITH extra state into the local model) loads too;
- a checkpoint missing a real tensor is refused with one message naming how many tensors and
  the first few keys (not thousands of names), and the checkpoint is left untouched.
The same path with real TE modules runs on the GPU machine (tests/gpu/test_te_backend.py).
Where to look on failure: megatron_navil/checkpoint/ (load).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from megatron_navil import checkpoint as ck
from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.models import navil as navil_module
from megatron_navil.models.backends import get_backend
from megatron_navil.models.local_layers import RMSNorm
from megatron_navil.models.navil import NaViLModel

pytestmark = pytest.mark.processes  # every test here starts a process


class ExtraStateRMSNorm(RMSNorm):
    """RMSNorm that, like TE's RMSNorm op, carries extra state (here: a uint8 byte tensor)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([7, 7, 7], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state = state


def use_extra_state_norms(monkeypatch) -> None:
    """Models built from now on have norms that carry extra state (the TE norms' behaviour)."""

    def patched(name, row_multiple=1, grouped_experts=True):
        return dataclasses.replace(
            get_backend(name, row_multiple, grouped_experts), rms_norm=ExtraStateRMSNorm
        )

    monkeypatch.setattr(navil_module, "get_backend", patched)


def _model(cfg, seed):
    torch.manual_seed(seed)
    return NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))


def _weights(model):
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _tree_digest(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_local_checkpoint_loads_into_model_with_extra_state(
    megatron_single_process, tmp_path, monkeypatch
):
    cfg = get_flavor("debug-qwen3")
    local = _model(cfg, seed=1)
    ck.save(tmp_path, 1, ck.model_sharded_state_dict([local]), cfg)
    use_extra_state_norms(monkeypatch)
    target = _model(cfg, seed=2)
    extra = [
        k for k in ck.model_sharded_state_dict([target])["model"] if k.endswith("_extra_state")
    ]
    assert len(extra) > 10, "the test model must request extra state like a TE model does"
    ck.load_model(tmp_path, [target], cfg)
    want, got = _weights(local), _weights(target)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_checkpoint_with_extra_state_loads_into_local_model(
    megatron_single_process, tmp_path, monkeypatch
):
    cfg = get_flavor("debug-internlm2")
    use_extra_state_norms(monkeypatch)
    source = _model(cfg, seed=3)
    ck.save(tmp_path, 1, ck.model_sharded_state_dict([source]), cfg)
    monkeypatch.undo()
    local = _model(cfg, seed=4)
    ck.load_model(tmp_path, [local], cfg)
    want = _weights(source)
    assert all(torch.equal(want[k], v) for k, v in _weights(local).items())


def test_missing_tensor_is_refused_naming_count_and_first_keys(megatron_single_process, tmp_path):
    cfg = get_flavor("debug-internlm2")
    source = _model(cfg, seed=5)
    state = ck.model_sharded_state_dict([source])
    dropped = sorted(k for k in state["model"] if ".layers.0." in k and "language_model" in k)
    assert len(dropped) > 5
    for k in dropped:
        del state["model"][k]
    ck.save(tmp_path, 1, state, cfg)
    before = _tree_digest(tmp_path)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_model(tmp_path, [_model(cfg, seed=6)], cfg)
    msg = str(err.value)
    m = re.search(r"the checkpoint lacks (\d+) model tensors \(and 0 optimizer", msg)
    assert m, msg
    # every dropped tensor is counted (gated fc1 weights count as their _w/_v halves); the
    # TE-style _extra_state entries among the dropped keys are not
    n = int(m.group(1))
    assert n >= len([k for k in dropped if not k.endswith("_extra_state")]), msg
    assert f"and {n - 5} more" in msg and msg.count("\n") < 12, msg
    assert "language_model.decoder.layers.0.input_layernorm.weight" in msg, msg
    assert "a model of another structure" in msg, msg
    assert _tree_digest(tmp_path) == before
