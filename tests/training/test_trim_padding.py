"""Trimming the padding of a micro-batch (training.trim_padding, PP = 1) changes the work, not
the numbers.

- `NaViLBatch.trim_padding`: T becomes the real tokens rounded up to the multiple; the kept
  padding stays the final cu_seqlens sample (positions from 0, no loss), an emptied padding
  sample is dropped, every field is cut consistently, and a batch without a padding record, or
  already short enough, is returned unchanged.
- `padding_trim_multiple`: 16, raised to the FP8 row multiple and to the TP size under SP; None
  when switched off and with pipeline size > 1 (stages exchange activations of the fixed
  seq_length shape, so trimming does not apply there; the trainer says so once).
- Parity through the step's real code path (`forward_step` on the debug model, CPU, fp32): the
  loss sum, the counted tokens and every parameter's gradient are the same with and without
  trimming, for a pack with images and text and for two packs concatenated (micro_batch_size 2,
  where only the last pack's padding is trailing). Tolerance 1e-5 relative of each tensor's
  largest entry: the padding tokens are a separate attention sample without loss, so they touch
  no real token; only the GEMMs' row count changes, which can change CPU blocking (last bits).
Where to look on failure: megatron_navil/batch.py (trim_padding), training/step.py,
training/data.py (concat_packs keeps the last pack's padding record).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.config.training import TrainingConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.navil import NaViLModel
from megatron_navil.pack_meta import PackMeta
from megatron_navil.training.data import concat_packs
from megatron_navil.training.flops import micro_batch_flops
from megatron_navil.training.step import forward_step, padding_trim_multiple

SAMPLES = [[3, [(2, 4), (4, 6)], 5], [7], [2, [(2, 2)], 2, [(4, 2)], 3]]


def _batch(cfg, seq_length=256, seed=1, samples=SAMPLES):
    return synthetic_batch(cfg, seq_length, torch.Generator().manual_seed(seed), samples)


def test_trim_keeps_real_tokens_and_a_short_padding_sample():
    cfg = get_flavor("debug-internlm2")
    b = _batch(cfg)
    pad = b.metadata["padding_tokens"]
    used = b.num_tokens - pad
    assert pad > 16 and used % 16  # the case under test: a partial block of padding is kept
    t = b.trim_padding(16)
    keep = -(-used // 16) * 16
    assert t.num_tokens == keep and t.metadata["padding_tokens"] == keep - used
    assert t.cu_seqlens.tolist() == b.cu_seqlens[:-1].tolist() + [keep]
    assert t.cu_seqlens.dtype == b.cu_seqlens.dtype
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(getattr(t, name), getattr(b, name)[:keep]), name
    assert torch.equal(t.position_ids[used:], torch.arange(keep - used))
    assert float(t.loss_mask[used:].abs().sum()) == 0.0
    assert t.pixel_values is b.pixel_values and t.grid_thw is b.grid_thw
    t.validate(cfg)


def test_trim_drops_an_emptied_padding_sample():
    cfg = get_flavor("debug-internlm2")
    b = _batch(cfg, samples=[[16], [32]])  # 48 real tokens: a multiple of 16
    t = b.trim_padding(16)
    assert t.num_tokens == 48 and t.cu_seqlens.tolist() == [0, 16, 48]
    assert t.metadata["padding_tokens"] == 0
    t.validate(cfg)


def test_trim_leaves_batches_it_cannot_or_need_not_trim():
    cfg = get_flavor("debug-internlm2")
    b = _batch(cfg)
    assert b.trim_padding(256) is b  # already a multiple
    b.metadata.pop("padding_tokens")
    assert b.trim_padding(16) is b  # no record of padding: a zero-loss last sample may be real
    full = _batch(cfg, seq_length=64, samples=[[64]])
    assert full.metadata["padding_tokens"] == 0 and full.trim_padding(16) is full


def test_trim_multiple_by_layout():
    training = TrainingConfig()
    assert padding_trim_multiple(training, ParallelConfig(), PrecisionConfig()) == 16
    sp3 = ParallelConfig(tensor_model_parallel_size=3, sequence_parallel=True)
    assert padding_trim_multiple(training, sp3, PrecisionConfig()) == 48
    mx = PrecisionConfig(backend="transformer_engine", fp8="mxfp8")
    assert padding_trim_multiple(training, ParallelConfig(), mx) == 32
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    assert padding_trim_multiple(training, pp2, PrecisionConfig()) is None
    off = TrainingConfig(trim_padding=False)
    assert padding_trim_multiple(off, ParallelConfig(), PrecisionConfig()) is None


def test_concatenated_packs_trim_only_the_trailing_padding():
    cfg = get_flavor("debug-internlm2")
    a, b = _batch(cfg, 128, 1, [[5, [(2, 2)], 3]]), _batch(cfg, 128, 2, [[9], [4]])
    cat = concat_packs([a, b])
    assert cat.metadata["padding_tokens"] == b.metadata["padding_tokens"]
    t = cat.trim_padding(16)
    used = 128 + 13
    assert t.num_tokens == -(-used // 16) * 16
    assert t.cu_seqlens[:-1].tolist() == cat.cu_seqlens[:-1].tolist()  # a's padding is kept
    # the padding records stay true: the model-FLOP count (padding excluded) is unchanged
    assert micro_batch_flops(cfg, t) == micro_batch_flops(cfg, cat)
    emptied = cat.trim_padding(used)  # keep == used: the trailing padding sample goes
    assert emptied.metadata["padding_segments"] == cat.metadata["padding_segments"][:-1]
    assert micro_batch_flops(cfg, emptied) == micro_batch_flops(cfg, cat)


def _step(model, batch, trim):
    model.zero_grad(set_to_none=True)
    output, loss_func = forward_step(iter([batch]), model, trim_multiple=trim)
    loss_sum, num_tokens, _ = loss_func(output)
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), int(num_tokens), output.shape[0], grads


@pytest.mark.parametrize("meta", [False, True], ids=["", "pack_meta"])
@pytest.mark.parametrize("packs", [1, 2], ids=["one_pack", "two_packs"])
def test_loss_and_grads_equal_with_and_without_trimming(megatron_single_process, packs, meta):
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    model.train()
    batch = concat_packs([_batch(cfg, 256, seed) for seed in range(1, packs + 1)])
    if meta:  # the loader's host metadata travels through the trim
        batch = dataclasses.replace(batch, pack_meta=PackMeta.build(cfg, batch))
    loss_full, n_full, t_full, g_full = _step(model, batch, None)
    loss_trim, n_trim, t_trim, g_trim = _step(model, batch, 16)
    assert t_full == 256 * packs and t_trim < t_full - 16  # the model really saw fewer tokens
    assert n_trim == n_full > 0
    scale = float(loss_full.abs())
    torch.testing.assert_close(loss_trim, loss_full, atol=1e-5 * scale, rtol=0)
    assert g_full.keys() == g_trim.keys() and len(g_full) > 0
    for name, g in g_full.items():
        atol = 1e-5 * max(float(g.abs().max()), 1e-12)
        torch.testing.assert_close(g_trim[name], g, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("multiple", [16, None], ids=["partial_padding_kept", "padding_emptied"])
def test_trimmed_pack_meta_is_the_trimmed_batchs(multiple):
    """The host metadata travels through trimming: equal to metadata built from the trimmed
    batch (so the model, which checks it, accepts it and reads the same rows)."""
    cfg = get_flavor("debug-internlm2")
    for b in (_batch(cfg), _batch(cfg, samples=[[16], [32]]), concat_packs([_batch(cfg)] * 2)):
        b = dataclasses.replace(b, pack_meta=PackMeta.build(cfg, b))
        used = b.num_tokens - b.metadata["padding_tokens"]
        t = b.trim_padding(multiple or used)
        want = PackMeta.build(cfg, dataclasses.replace(t, pack_meta=None))
        got = t.pack_meta
        assert got.seqlens == want.seqlens and got.max_seqlen == want.max_seqlen
        assert got.num_visual == want.num_visual
        for name in ("image_slots", "loss_rows", "text_rows"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        got.check_matches(t.num_tokens, t.cu_seqlens.numel())
