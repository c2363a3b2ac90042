"""The routing protocol of the routed spec slots (models/routed.py).

- A plain module a spec names (any class with forward(x)) is built to accept `routing=` and
  ignore it: same output, same class name, still an instance of its class, same parameters and
  state-dict keys (no wrapping level); the same holds for a factory class whose `__new__`
  returns an instance of another class (how Megatron's TENorm builds a te.pytorch.RMSNorm, the
  case a spec-level subclass would miss: TE cannot run here, so this stands in for it).
- A modality-aware module (`accepts_routing = True`) is left as it is and receives the routing.
- The real slots: with attention and FFN experts both off, every routed slot of the LLM holds
  Megatron's plain modules, the model trains, its state-dict keys are exactly those of the same
  model built without the adapter, and every routed slot was called with the routing.
Where to look on failure: megatron_navil/models/routed.py, attention.py, layer.py.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models import routed
from megatron_navil.models.navil import NaViLModel

ROUTING = object()  # stands in for a ModalityRouting: plain modules must never look at it


class Plain(torch.nn.Module):
    def __init__(self, width: int, scale: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((width,), scale))

    def forward(self, x):
        return x * self.weight


class Factory:
    """Like Megatron's TENorm: the class a spec names, whose __new__ returns another module."""

    def __new__(cls, width: int):
        return Plain(width, scale=2.0)


class Aware(torch.nn.Module):
    accepts_routing = True

    def forward(self, x, routing):
        self.seen = routing
        return x


@pytest.mark.parametrize("spec", [Plain, ModuleSpec(module=Plain, params={"scale": 3.0}), Factory])
def test_plain_module_accepts_and_ignores_routing(spec):
    module = routed.build_routed(spec, width=4)
    x = torch.randn(2, 4)
    assert isinstance(module, Plain) and type(module).__name__ == "Plain"
    assert list(module.state_dict()) == ["weight"]
    assert torch.equal(module(x, routing=ROUTING), x * module.weight)
    assert torch.equal(module(x), x * module.weight)  # still callable without it
    adapted = type(module)
    assert routed.accept_routing(module) is module and type(module) is adapted  # idempotent


def test_routing_aware_module_is_left_alone():
    module = routed.build_routed(Aware)
    assert type(module) is Aware
    module(torch.zeros(1), routing=ROUTING)
    assert module.seen is ROUTING


def _spy_routed_slots(model, calls):
    """Record, per routed slot, whether it was called with a routing."""
    slots = ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm", "mlp")
    for name, module in model.language_model.named_modules():
        if name.rsplit(".", 1)[-1] in slots:

            def hook(mod, args, kwargs, name=name):
                calls[name] = kwargs.get("routing")

            module.register_forward_pre_hook(hook, with_kwargs=True)


def test_layer_without_experts_runs_plain_megatron_modules(megatron_single_process, monkeypatch):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP

    cfg = get_flavor("debug-qwen3").apply_overrides(
        {"experts.attention_experts": False, "experts.ffn_experts": False}
    )
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    layer = model.language_model.decoder.layers[0]
    attn = layer.self_attention
    assert isinstance(attn.linear_qkv, ColumnParallelLinear)
    assert isinstance(attn.linear_proj, RowParallelLinear)
    assert isinstance(layer.mlp, MLP) and attn.q_layernorm is not None

    calls = {}
    _spy_routed_slots(model, calls)
    model.train()
    batch = synthetic_batch(cfg, 160, torch.Generator().manual_seed(3))
    model(**batch.model_inputs()).sum().backward()
    assert len(calls) == 5 * cfg.llm.num_layers
    assert all(r is not None for r in calls.values()), calls  # the routing reached every slot
    assert all(p.grad is not None for p in model.language_model.decoder.parameters())

    # The adapter adds no key level: the same model built without it has the same keys.
    monkeypatch.setattr(routed, "accept_routing", lambda module: module)
    bare = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    assert list(bare.state_dict()) == list(model.state_dict())
