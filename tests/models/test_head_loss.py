"""The fused, chunked LM head + cross entropy (models/head_loss.py, precision.
lm_head_loss_chunk_rows) gives the plain path's numbers.

Proves, on the debug model (fp32, CPU, one process; vocabulary padded, so the -inf columns are
exercised): the per-position loss and every parameter's gradient equal those of the plain path
(whole logits tensor + Megatron's vocab-parallel cross entropy) for chunks of 1, 7 and more rows
than the pack has; tolerance 1e-6 relative on the loss and 1e-5 of each gradient's largest entry
(only the order of fp32 sums differs: the weight gradient accumulates over chunks). The function
alone against torch's cross_entropy on random fp32 inputs with weighted rows, including rows whose
target is the last real column (1e-5: fp32 sums in another order). TP = 2 with and without SP:
tests/distributed/test_parallel_parity.py (`*_head_chunk5` and every other layout against a plain-
path reference).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_navil.config.base import ConfigError
from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.head_loss import chunked_head_cross_entropy
from megatron_navil.models.navil import NaViLModel
from megatron_navil.models.tp_regions import TPRegion


def _step(model, batch, chunk):
    model.language_model.head_loss_chunk = chunk
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs())
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("chunk", [1, 7, 100000])
def test_model_loss_and_grads_equal_the_plain_path(megatron_single_process, chunk):
    cfg = get_flavor("debug-internlm2")
    # a vocabulary that is not a multiple of the padding unit: padded columns at -inf
    cfg.llm = dataclasses.replace(cfg.llm, make_vocab_size_divisible_by=384)
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    model.train()
    lm = model.language_model
    assert lm.padded_vocab_size > lm.vocab_size  # padded columns are in play
    batch = synthetic_batch(cfg, 192, torch.Generator().manual_seed(3))
    plain, g_plain = _step(model, batch, 0)
    fused, g_fused = _step(model, batch, chunk)
    assert (plain != 0).sum() > 10
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6 * float(plain.abs().max()))
    assert g_plain.keys() == g_fused.keys() and "language_model.output_layer.weight" in g_plain
    for name, g in g_plain.items():
        scale = float(g.abs().max())
        assert float((g_fused[name] - g).abs().max()) <= 1e-5 * max(scale, 1e-12), name


def test_function_matches_torch_cross_entropy():
    torch.manual_seed(1)
    n, d, v, real = 37, 16, 40, 33  # 7 padded vocabulary columns
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    target = torch.randint(0, real, (n,))
    target[:3] = real - 1
    loss = chunked_head_cross_entropy(x, w, target, TPRegion(None, False), real, 5)
    (loss * torch.arange(1, n + 1)).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = F.cross_entropy((x @ w.t())[:, :real], target, reduction="none")
    (want * torch.arange(1, n + 1)).sum().backward()
    # fp32 both sides; only the order of sums differs (chunks, max-shift before exp)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for got, ref in ((gx, x.grad), (gw, w.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_negative_chunk_is_refused():
    with pytest.raises(ConfigError, match="lm_head_loss_chunk_rows must be >= 0"):
        PrecisionConfig(lm_head_loss_chunk_rows=-1).validate()
