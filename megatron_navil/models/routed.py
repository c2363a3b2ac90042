"""The routing protocol of the spec slots a modality expert can fill.

The slots `linear_qkv`, `linear_proj`, `q_layernorm`, `k_layernorm` (NaViLSelfAttention) and
`mlp` (NaViLTransformerLayer) are ALWAYS called with the keyword `routing=` (a ModalityRouting,
or None in the vision encoder). A module that uses it says so with the class attribute
`accepts_routing = True` (ModalityColumnParallelLinear, ModalityRowParallelLinear, ModalityNorm,
ModalityMoELayer). Any other module a spec puts in such a slot (Megatron's or Transformer
Engine's linears, norms, MLP; our TPRMSNorm) is built with `build_routed`, which makes it accept
and ignore the keyword. So the owner never asks what it was given (no isinstance checks), and a
spec can swap a plain module for a modality expert or back without touching the owner.

How: the built instance's class is replaced by a subclass of that class (made once per class)
whose forward drops `routing` and calls the original forward. The instance, its parameters,
hooks and state-dict keys are untouched (no wrapping module, so no extra key level), and the
subclass keeps the class name. It is applied to the INSTANCE, not to the class named in the
spec, because some spec classes are factories: Megatron's TENorm builds and returns a
`te.pytorch.RMSNorm` from `__new__`, so a subclass of TENorm would never be what runs.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.spec_utils import build_module


def build_routed(spec, *args, **kwargs) -> torch.nn.Module:
    """`build_module(spec, ...)` for a routed slot: the result accepts `routing=`."""
    return accept_routing(build_module(spec, *args, **kwargs))


def accept_routing(module: torch.nn.Module) -> torch.nn.Module:
    """Make `module(..., routing=r)` valid: unchanged if its class declares `accepts_routing`,
    otherwise its class becomes a subclass whose forward ignores `routing`."""
    if getattr(module, "accepts_routing", False):
        return module
    module.__class__ = _ignoring_routing(type(module))
    return module


@functools.lru_cache(maxsize=None)
def _ignoring_routing(cls: type) -> type:
    def forward(self, *args, routing=None, **kwargs):
        return super(adapted, self).forward(*args, **kwargs)

    adapted = type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "accepts_routing": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        },
    )
    return adapted
