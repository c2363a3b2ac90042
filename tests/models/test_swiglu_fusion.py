"""The fused-SwiGLU switch (precision.bias_swiglu_fusion) changes speed, not numbers, and the
FFN experts' routing probabilities no longer promote the SwiGLU output to fp32.

- Megatron's fused kernels (`bias_swiglu_impl` for the dense MLP, `weighted_bias_swiglu_impl`
  for the experts; torch.compile'd, so they really run on CPU) equal SiLU(a) * b computed by
  torch, forward and input gradient. Tolerance fp32: 1e-6 relative of the largest entry (the
  kernel's hand-written backward and inductor's vectorised exp differ from autograd's in the
  last bits); bf16: 2 ulp (8e-3 relative: inductor keeps the product in fp32 and rounds once,
  eager rounds after SiLU and after the product).
- The whole debug model (local backend, fp32, dense MLP and modality-expert FFNs) gives the same
  per-position loss and the same gradient for every parameter with the switch on and off
  (1e-5 relative of each tensor's largest entry: only the activation's last bits differ).
- The switch reaches Megatron's TransformerConfig of the LLM (None follows the backend) and
  never the vision encoder's: Megatron's fused GELU is the tanh approximation.
- The EP = 1 expert path hands the experts probabilities in the activation dtype (the fp32 ones
  made an fp32 copy of the whole [rows, ffn] intermediate); a bf16 expert's output is bitwise
  the same with bf16 and fp32 probabilities, fused and unfused (x * 1 is exact).
Tests that run the fused kernel are marked `processes`: torch.compile starts the C++ compiler.
Where to look on failure: models/transformer_config.py (bias_swiglu_fusion), models/moe.py
(_fast_path), Megatron's fusions/fused_bias_swiglu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, weighted_bias_swiglu_impl

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.moe import ModalityMoELayer
from megatron_navil.models.navil import NaViLModel
from megatron_navil.models.transformer_config import (
    bias_swiglu_fusion,
    llm_transformer_config,
    vision_transformer_config,
)


def _reference(y: torch.Tensor, w=None) -> torch.Tensor:
    a, b = torch.chunk(y, 2, dim=-1)
    out = F.silu(a) * b
    return out if w is None else (out * w).to(y.dtype)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = max(float(want.abs().max()), 1e-12)
    torch.testing.assert_close(got.float(), want.float(), atol=rel * scale, rtol=0)


@pytest.mark.processes
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("weighted", [False, True], ids=["dense", "experts"])
def test_fused_kernel_matches_torch(dtype, rel, weighted):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(24, 2 * 40, generator=g).to(dtype)
    grad = torch.randn(24, 40, generator=g).to(dtype)
    w = torch.ones(24, 1, dtype=dtype) if weighted else None
    y_ref, y_fused = y.clone().requires_grad_(), y.clone().requires_grad_()
    want = _reference(y_ref, w)
    got = (
        weighted_bias_swiglu_impl(y_fused, None, w) if weighted else bias_swiglu_impl(y_fused, None)
    )
    _close(got, want, rel)
    want.backward(grad)
    got.backward(grad)
    _close(y_fused.grad, y_ref.grad, rel)


def _loss_and_grads(cfg, fusion: bool):
    torch.manual_seed(0)
    precision = PrecisionConfig(backend="local", bias_swiglu_fusion=fusion)
    model = NaViLModel(cfg, ParallelConfig(), precision)
    assert model.config.bias_activation_fusion is fusion
    batch = synthetic_batch(cfg, 128, torch.Generator().manual_seed(1))
    loss = model(**batch.model_inputs())
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.processes
@pytest.mark.parametrize("ffn_experts", [True, False], ids=["experts", "dense_mlp"])
def test_model_loss_and_grads_equal_with_fusion_on_and_off(megatron_single_process, ffn_experts):
    cfg = get_flavor("debug-internlm2").apply_overrides({"experts.ffn_experts": ffn_experts})
    loss_off, grads_off = _loss_and_grads(cfg, False)
    loss_on, grads_on = _loss_and_grads(cfg, True)
    _close(loss_on, loss_off, 1e-5)
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_off.items():
        _close(grads_on[name], g, 1e-5)


def test_switch_reaches_the_llm_and_never_the_vit():
    cfg, par = get_flavor("debug-internlm2"), ParallelConfig()
    assert bias_swiglu_fusion(PrecisionConfig(), "transformer_engine") is True
    assert bias_swiglu_fusion(PrecisionConfig(), "local") is False
    assert (
        bias_swiglu_fusion(PrecisionConfig(bias_swiglu_fusion=False), "transformer_engine") is False
    )
    on = PrecisionConfig(backend="local", bias_swiglu_fusion=True)
    assert llm_transformer_config(cfg, par, on, "local").bias_activation_fusion is True
    assert vision_transformer_config(cfg, par, on, "local").bias_activation_fusion is False
    assert (
        llm_transformer_config(cfg, par, PrecisionConfig(), "local").bias_activation_fusion is False
    )


@pytest.mark.parametrize(
    "fused", [False, pytest.param(True, marks=pytest.mark.processes)], ids=["unfused", "fused"]
)
def test_experts_get_probs_in_activation_dtype(megatron_single_process, fused):
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    precision = PrecisionConfig(backend="local", params_dtype="bfloat16")
    model = NaViLModel(cfg, ParallelConfig(), precision)
    moe = next(m for m in model.modules() if isinstance(m, ModalityMoELayer))
    seen = []
    hook = moe.experts.register_forward_pre_hook(lambda mod, args: seen.append(args))
    batch = synthetic_batch(cfg, 128, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(**batch.model_inputs())
    hook.remove()
    x, tokens_per_expert, probs = seen[0]
    assert x.dtype == probs.dtype == torch.bfloat16
    # the experts read the switch from their (shared) TransformerConfig at call time
    moe.experts.config.bias_activation_fusion = fused
    with torch.no_grad():
        low, _ = moe.experts(x, tokens_per_expert, probs)
        high, _ = moe.experts(x, tokens_per_expert, probs.float())
    assert low.dtype == high.dtype == torch.bfloat16
    assert torch.equal(low, high)
