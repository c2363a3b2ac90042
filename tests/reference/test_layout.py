"""Image resize rule, multi-scale pyramid and image token layout (pure functions on sizes).

The 1000 x 750 example is from the released README: 5 scales and 1580 <IMG_CONTEXT> tokens,
768 of them for the full scale. It only comes out with the released rounding (resize with
factor 1, then pad to 32 px; budgets from the padded grid); rounding the size to multiples of
32 (the usual Qwen2-VL rule) gives 713 tokens for the full scale instead. Exact integers, no
tolerance.
"""

import pytest
import torch

from megatron_navil.config import get_flavor
from megatron_navil.reference import (
    image_token_ids,
    multiscale_grids,
    multiscale_plan,
    num_image_tokens,
    resize_for_scale,
    smart_resize,
)


@pytest.fixture
def cfg():
    return get_flavor("navil-2b")


@pytest.mark.parametrize("h, w", [(750, 1000), (1000, 750)])
def test_readme_example_1000x750(cfg, h, w):
    grids = multiscale_grids(h, w, cfg)
    assert len(grids) == 5
    assert num_image_tokens(grids) == 1580
    assert num_image_tokens(grids[-1:]) == 768  # full scale alone
    if h < w:
        assert grids == [(14, 20), (20, 26), (26, 34), (34, 46), (48, 64)]
    ids = image_token_ids(cfg, grids)
    assert ids.count(cfg.img_context_id) == 1580


def test_qwen2vl_rounding_would_not_give_768():
    # documents why the factor-1-then-pad rule is the right one
    h, w = smart_resize(750, 1000, 256 * 256, 24576 * 256, factor=32)
    assert (h // 32) * (w // 32) == 713
    assert resize_for_scale(750, 1000, 256 * 256, 24576 * 256).padded == (768, 1024)


def test_smart_resize_bounds():
    assert smart_resize(750, 1000, 256 * 256, 24576 * 256) == (750, 1000)  # in range: unchanged
    h, w = smart_resize(4000, 3000, 256 * 256, 1024 * 256)
    assert h * w <= 1024 * 256 and abs(h / w - 4 / 3) < 0.01
    h, w = smart_resize(100, 60, 256 * 256, 24576 * 256)
    assert h * w >= 256 * 256 and abs(h / w - 100 / 60) < 0.02
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 1, 10**9)


def test_scale_budgets_are_float32_like_the_release(cfg):
    # The release multiplies an int64 grid tensor by 0.7071**2 -> a float32 budget, and torch
    # divides `h*w / budget` as reciprocal(budget) * h*w in float32. For this image the second
    # scale's resize target differs by one pixel from float64 arithmetic; pin the float32 one.
    plan = multiscale_plan(1952, 3108, cfg)
    assert [s.grid for s in plan] == [
        (18, 28),
        (24, 38),
        (34, 52),
        (46, 72),
        (62, 100),
        (88, 138),
        (122, 196),
    ]
    assert plan[1].resized == (376, 600)
    budget64 = 34 * 52 * 256 * 0.7071**2  # that scale's budget (from the next grid) in float64
    assert resize_for_scale(1952, 3108, 65536, budget64).resized == (377, 600)
    for s in plan:  # padding is bottom/right to multiples of 32 px
        assert s.padded[0] % 32 == 0 and s.padded[1] % 32 == 0
        assert 0 <= s.padded[0] - s.resized[0] < 32 and 0 <= s.padded[1] - s.resized[1] < 32


def test_token_layout_by_hand():
    cfg = get_flavor("debug-internlm2")
    tok = {
        name: cfg.special_token_id(name)
        for name in ("<img>", "</img>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>")
    }
    C, L, F = tok["<IMG_CONTEXT>"], tok["<IMG_LINE_BREAK>"], tok["<IMG_FRAME_BREAK>"]
    got = image_token_ids(cfg, [(2, 4), (4, 2)])  # merged 1 x 2, then 2 x 1
    assert got == [tok["<img>"], C, C, L, F, C, L, C, L, F, tok["</img>"]]
    assert tok["<IMG_CONTEXT>"] == 502 and tok["<img>"] == 504  # debug flavor ids from 500


def test_plan_is_smallest_first_and_shrinking(cfg):
    for h, w in [(224, 224), (1080, 1920), (3000, 400), (64, 64)]:
        plan = multiscale_plan(h, w, cfg)
        sizes = [s.grid[0] * s.grid[1] for s in plan]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
        assert all(s.grid[0] % 2 == 0 and s.grid[1] % 2 == 0 for s in plan)
        assert torch.tensor(sizes[-1]) <= cfg.max_dynamic_patch
