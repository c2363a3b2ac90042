"""Image token layout of the loader against navil-reference.md, single- and multi-scale.

Proves: with the NaViL-2B sizes (min 256 / max 24576 patches) a 1000x750 image gives the
README's 5 scales (patch grids 14x20, 20x26, 26x34, 34x46, 48x64; smallest first) and 1580
<IMG_CONTEXT> tokens (768 single-scale); the planner's token count per image equals the length
of the layout the builder emits; and a real 1000x750 JPEG fed through navil-preprocess and the
loader comes out as exactly the hand-written layout (`<img>`, per scale rows of w/2
<IMG_CONTEXT> + <IMG_LINE_BREAK>, <IMG_FRAME_BREAK>, `</img>`), with grid_thw rows in the same
order and pixel_values holding h*w patches per scale. Exact integer comparisons.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_navil.data.layout import image_token_ids
from megatron_navil.data.sizing import ImageSizer
from tests.data.corpus import model_config, photo, preprocess

README_GRIDS = [(14, 20), (20, 26), (26, 34), (34, 46), (48, 64)]


def _expected_tokens(cfg, grids) -> list[int]:
    """The layout of navil-reference.md, written out by hand (not via layout.py)."""
    sid = cfg.special_token_id
    out = [sid("<img>")]
    for h, w in grids:
        for _ in range(h // 2):
            out += [sid("<IMG_CONTEXT>")] * (w // 2) + [sid("<IMG_LINE_BREAK>")]
        out.append(sid("<IMG_FRAME_BREAK>"))
    return out + [sid("</img>")]


def test_readme_example_scales_and_token_count(tok):
    cfg = model_config(tok, "navil-2b")
    multi = ImageSizer(cfg, multiscale=True)
    assert [s.grid for s in multi.scales(750, 1000)] == README_GRIDS
    ctx = cfg.special_token_id("<IMG_CONTEXT>")
    ids = image_token_ids(cfg, README_GRIDS)
    assert ids.count(ctx) == 1580 and ids == _expected_tokens(cfg, README_GRIDS)
    assert multi.tokens(750, 1000) == len(ids)
    single = ImageSizer(cfg, multiscale=False)
    assert [s.grid for s in single.scales(750, 1000)] == [(48, 64)]
    assert image_token_ids(cfg, [(48, 64)]).count(ctx) == 768


@pytest.mark.parametrize("multiscale", [False, True])
def test_planned_image_tokens_equal_emitted_layout(tok, multiscale):
    cfg = model_config(tok, "navil-2b")
    sizer = ImageSizer(cfg, multiscale)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 3000, size=(200, 2)).tolist():
        grids = [s.grid for s in sizer.scales(h, w)]
        assert sizer.tokens(h, w) == len(image_token_ids(cfg, grids))


@pytest.fixture(scope="module")
def readme_dataset(tmp_path_factory, tok_dir):
    root = str(tmp_path_factory.mktemp("readme"))
    os.makedirs(os.path.join(root, "images"))
    photo("astronaut", (1000, 750)).save(os.path.join(root, "images", "big.jpg"), quality=92)
    photo("coffee", (300, 200)).save(os.path.join(root, "images", "small.jpg"), quality=92)
    recs = [
        {"image": "big.jpg", "text": "a man standing near a rocket."},
        {"images": ["small.jpg", "big.jpg"], "text": "a cup <image> and a man <image> ."},
    ]
    return preprocess(root, recs, tok_dir).root


@pytest.mark.parametrize("multiscale,grids", [(True, README_GRIDS), (False, [(48, 64)])])
def test_loader_emits_reference_layout(readme_dataset, make_loader, tok, multiscale, grids):
    cfg = model_config(tok, "navil-2b")
    loader = make_loader(
        [readme_dataset], model_cfg=cfg, seq_length=8192, multiscale=multiscale, shuffle=False
    )
    batch = next(loader)
    batch.validate(cfg)
    assert batch.metadata["samples"] == 2
    first = int(batch.cu_seqlens[1])  # the caption sample comes first (file order)
    expected = [tok.bos_id] + _expected_tokens(cfg, grids)
    assert batch.tokens[: len(expected)].tolist() == expected
    caption = tok.encode("a man standing near a rocket.", allow_special=False) + [tok.eos_id]
    assert batch.tokens[len(expected) : first].tolist() == caption
    g = batch.grid_thw.tolist()
    assert g[: len(grids)] == [[1, h, w] for h, w in grids]
    ctx = cfg.special_token_id("<IMG_CONTEXT>")
    assert int((batch.tokens[:first] == ctx).sum()) == (1580 if multiscale else 768)
    # whole pack: merged tokens == <IMG_CONTEXT> count, patches == sum of grid areas
    gt = batch.grid_thw
    assert int((gt[:, 1] * gt[:, 2]).sum()) == batch.pixel_values.shape[0]
    assert int((gt[:, 1] // 2 * (gt[:, 2] // 2)).sum()) == int((batch.tokens == ctx).sum())
