"""The stated rules of the MFU convention (training/flops.py, training/flop_rules.py), one by one,
on hand-computed cases: the backward rule per GEMM, frozen parts, padding (also across
concatenated packs), window pairs, the FP8 peak. tests/training/test_flops_counted.py checks the
whole count against torch's FLOP counter; this module pins each rule so a failure names it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.training import LoggingConfig, StageConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.training.data import concat_packs
from megatron_navil.training.flop_rules import Branches, FlopCount, Op, walk
from megatron_navil.training.flops import (
    ALL_PARTS,
    FP8_PEAK_TFLOPS,
    PEAK_TFLOPS,
    batch_counts,
    micro_batch_count,
    part_counts,
    peak_tflops,
    trained_parts,
    vision_pairs,
)

SAMPLES = [[3, [(4, 4), (8, 12)], 5], [7], [2, [(6, 10)], 2, [(4, 2)], 3]]
F = 100.0  # forward FLOPs of every op in the hand-made chains


def batch(cfg, seq=256, samples=SAMPLES):
    return synthetic_batch(cfg, seq, torch.Generator().manual_seed(0), samples)


# ------------------------------------------------------------------ the backward rule
def test_frozen_gemm_with_nothing_trained_upstream_has_no_backward():
    count, flows = walk([Op(F, "vision", 1), Op(F, None, 1)], frozenset({"text"}), False)
    assert count == FlopCount(2 * F, 0.0) and not flows


def test_first_trained_gemm_gets_wgrad_only_and_starts_dgrad_downstream():
    chain = [Op(F, "text", 1), Op(F, "vision", 1), Op(F, None, 1)]
    count, flows = walk(chain, frozenset({"text"}), False)
    # text: wgrad F (its input needs no grad); frozen vision GEMM: dgrad F; attention: 2F
    assert count == FlopCount(3 * F, F + F + 2 * F) and flows


def test_trained_gemm_under_a_gradient_gets_dgrad_and_wgrad():
    assert walk([Op(F, "text", 1)], ALL_PARTS, True)[0] == FlopCount(F, 2 * F)


def test_trained_weight_that_saw_no_row_starts_no_gradient():
    """An absent modality's expert does no model work, so nothing downstream needs dgrad."""
    chain = [Op(0.0, "visual_experts", 0), Op(F, "text", 1)]
    assert walk(chain, frozenset({"visual_experts"}), False)[0] == FlopCount(F, 0.0)


def test_expert_branches_start_from_the_same_input_and_merge():
    experts = Branches(((Op(F, "text", 1), Op(F, "text", 1)), (Op(F, "visual_experts", 1),)))
    count, flows = walk([experts], frozenset({"visual_experts"}), False)
    # the text chain stays gradient-free: its second GEMM's input depends on no trained weight
    assert count == FlopCount(3 * F, F) and flows


def test_a_trained_norm_starts_the_gradient_at_zero_cost():
    count, _ = walk([Op(0.0, "text", 1), Op(F, "vision", 1)], frozenset({"text"}), False)
    assert count == FlopCount(F, F)


# ------------------------------------------------------------------ frozen parts in the model
def test_full_training_is_three_times_forward_less_the_patch_embedding_dgrad():
    cfg = get_flavor("debug-qwen3")
    c = batch_counts(cfg, batch(cfg))
    v = cfg.vision
    patch_embed = 2 * v.num_channels * v.patch_size**2 * v.hidden_size * c.patches
    total = part_counts(cfg, c).total
    assert total.backward == pytest.approx(2 * total.forward - patch_embed, rel=1e-12)


def test_frozen_vit_at_the_input_does_no_backward():
    cfg = get_flavor("debug-qwen3")
    llm = frozenset({"text", "visual_experts"})
    parts = part_counts(cfg, batch_counts(cfg, batch(cfg)), llm)
    assert parts.vision.backward == 0.0 and parts.vision.forward > 0
    # ... while the LLM, fed by a trained token embedding, is fully trained: 2x forward
    assert all(layer.backward == 2 * layer.forward for layer in parts.layers)


def test_stage1_skips_exactly_the_text_weight_gradients():
    cfg = dataclasses.replace(
        get_flavor("debug-qwen3"),
        experts=dataclasses.replace(get_flavor("debug-qwen3").experts, attention_experts=False),
    )  # without attention experts QKV/proj/the text FFN are text weights on known rows
    c = batch_counts(cfg, batch(cfg))
    stage1 = part_counts(cfg, c, trained_parts(StageConfig(preset="stage1")))
    full = part_counts(cfg, c)
    d, f = cfg.llm.hidden_size, cfg.llm.ffn_hidden_size
    q, kv = (
        cfg.llm.num_attention_heads * cfg.llm.kv_channels,
        cfg.llm.num_query_groups * cfg.llm.kv_channels,
    )
    text = c.tokens - c.visual
    text_wgrad = (2 * d * (q + 2 * kv) + 2 * q * d) * c.tokens + 6 * d * f * text
    for s1, full_layer in zip(stage1.layers, full.layers):
        assert full_layer.backward - s1.backward == pytest.approx(text_wgrad, rel=1e-12)
    head_wgrad = 2 * d * cfg.llm.vocab_size * c.counted
    assert full.head.backward - stage1.head.backward == pytest.approx(head_wgrad, rel=1e-12)
    assert stage1.vision == full.vision


# ------------------------------------------------------------------ padding
def test_padding_is_not_model_work():
    cfg = get_flavor("debug-internlm2")
    padded = batch(cfg, seq=256)
    real = int(padded.metadata["tokens"])
    unpadded = batch(cfg, seq=real)
    assert unpadded.metadata["padding_tokens"] == 0 < padded.metadata["padding_tokens"]
    assert micro_batch_count(cfg, padded) == micro_batch_count(cfg, unpadded)
    hw = micro_batch_count(cfg, padded, include_padding=True)
    assert hw.forward > micro_batch_count(cfg, padded).forward


def test_padding_inside_concatenated_packs_is_left_out():
    cfg = get_flavor("debug-internlm2")
    a, b = batch(cfg, seq=256), batch(cfg, seq=192, samples=[[5, [(4, 6)], 9], [11]])
    both = concat_packs([a, b])
    assert both.metadata["padding_segments"] == [3, 6]
    assert micro_batch_count(cfg, both).total == pytest.approx(
        micro_batch_count(cfg, a).total + micro_batch_count(cfg, b).total, rel=1e-12
    )


# ------------------------------------------------------------------ windowed ViT attention
def test_window_pairs_are_per_window():
    cfg = get_flavor("debug-qwen3")
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, window_size=64)
    )  # 4x4-patch windows
    # 8x12 patches: 2x3 windows of 16 patches; 6x10: rows 4+2, columns 4+4+2 patches
    full, window = vision_pairs(cfg, torch.tensor([[1, 8, 12], [1, 6, 10]]))
    assert full == 96**2 + 60**2
    assert window == 6 * 16**2 + (2 * 16**2 + 3 * 8**2 + 4**2)


def test_without_windows_window_pairs_are_the_full_ones():
    cfg = get_flavor("debug-qwen3")
    full, window = vision_pairs(cfg, torch.tensor([[1, 8, 12]]))
    assert full == window == 96**2


# ------------------------------------------------------------------ peaks
def test_fp8_peak_is_the_dense_datasheet_value_and_configurable():
    assert FP8_PEAK_TFLOPS["H100"] == FP8_PEAK_TFLOPS["H200"] == 1979.0
    assert PEAK_TFLOPS["H100"] == 989.0
    assert peak_tflops(1500.0, fp8=True) == 1500.0
    if not torch.cuda.is_available():
        assert peak_tflops(None, fp8=True) is None  # no guess on a CPU
    assert LoggingConfig().fp8_peak_tflops is None
