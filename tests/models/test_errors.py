"""Inputs the model cannot take fail with one clear ValueError naming the problem:
placeholder/feature count mismatch (both counts named), a packed sequence longer than
configured, an image smaller than one merged 2x2 patch block, inconsistent grids."""

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.navil import NaViLModel


@pytest.fixture(scope="module")
def model(megatron_single_process):
    return NaViLModel(get_flavor("debug-internlm2"), ParallelConfig(), PrecisionConfig())


def _batch(model, samples, seq=96):
    return synthetic_batch(model.cfg, seq, torch.Generator().manual_seed(0), samples)


def test_placeholder_count_mismatch_names_both_counts(model):
    b = _batch(model, [[3, [(4, 4)], 2]])  # 4 <IMG_CONTEXT> slots
    grid = torch.tensor([[1, 4, 6]])  # but 6 merged tokens of features
    pixels = torch.zeros(24, b.pixel_values.shape[1])
    with pytest.raises(
        ValueError, match=r"has 4 <IMG_CONTEXT> placeholders .* produced 6 visual tokens"
    ):
        model(b.tokens, b.position_ids, b.cu_seqlens, pixel_values=pixels, grid_thw=grid)
    with pytest.raises(ValueError, match=r"4 <IMG_CONTEXT> placeholders .* produced 0"):
        model(b.tokens, b.position_ids, b.cu_seqlens)


def test_sequence_longer_than_configured(model):
    n = model.cfg.llm.max_sequence_length + 16
    b = _batch(model, [[n - 1]], seq=n)
    with pytest.raises(ValueError, match=rf"{n} tokens, more than llm.max_sequence_length = "):
        model(b.tokens, b.position_ids, b.cu_seqlens)


def test_image_smaller_than_one_merged_patch(model):
    b = _batch(model, [[3, [(2, 2)], 2]])
    with pytest.raises(ValueError, match=r"1x2 patches \(16x32 px\), smaller than one merged 2x2"):
        model(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            pixel_values=b.pixel_values[:2],
            grid_thw=torch.tensor([[1, 1, 2]]),
        )


def test_grid_and_pixel_count_disagree(model):
    b = _batch(model, [[3, [(2, 4)], 2]])
    with pytest.raises(ValueError, match=r"pixel_values has 7 patches but grid_thw describes 8"):
        model(
            b.tokens,
            b.position_ids,
            b.cu_seqlens,
            pixel_values=b.pixel_values[:7],
            grid_thw=b.grid_thw,
        )


def test_token_outside_vocab(model):
    b = _batch(model, [[10]])
    tokens = b.tokens.clone()
    tokens[0] = model.cfg.llm.vocab_size
    with pytest.raises(ValueError, match="outside the model vocab"):
        model(tokens, b.position_ids, b.cu_seqlens)
