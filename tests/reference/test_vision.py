"""Vision encoder: patch embedding, per-image confinement, window attention and its permutation.

What is proved (float64, so "unchanged" is asserted to 1e-12 and every such test has a control
that the perturbation does change something by far more):
- the patch embedding is a Linear on the (c, ph, pw)-flattened patch (Conv2d semantics);
- attention is confined to each grid_thw row (image or scale);
- window_order matches a hand-written permutation;
- window_size = 0 and windows covering the whole image give exactly the full-attention encoder;
- the released quirk: with all layers full-attention, keep_window_order=True returns the
  full-attention output permuted into window order, keep_window_order=False undoes it, and
  windowed layers confine attention to a window.
"""

import pytest
import torch
from reference_helpers import EXACT, make_model, random_pixels

from megatron_navil.reference import window_order


def _encode(model, grids, pixels):
    grid_thw = torch.tensor([(1, h, w) for h, w in grids])
    with torch.no_grad():
        return model.vision_model(pixels, grid_thw)


def test_patch_embedding_is_linear_on_flattened_patch():
    model = make_model()
    emb = model.vision_model.embeddings.patch_embedding
    x = random_pixels([(2, 2)], seed=1)
    want = x @ emb.weight.reshape(emb.weight.shape[0], -1).T + emb.bias
    torch.testing.assert_close(model.vision_model.embeddings(x), want, **EXACT)


def test_attention_is_confined_to_each_image():
    model = make_model()
    grids = [(4, 6), (2, 4), (6, 2)]
    pixels = random_pixels(grids, seed=2)
    out = _encode(model, grids, pixels)
    sizes = [h * w for h, w in grids]
    b0, b1 = sizes[0], sizes[0] + sizes[1]
    pixels2 = pixels.clone()
    pixels2[b0:b1] += 0.5  # perturb only the second image
    out2 = _encode(model, grids, pixels2)
    torch.testing.assert_close(out2[:b0], out[:b0], **EXACT)
    torch.testing.assert_close(out2[b1:], out[b1:], **EXACT)
    assert (out2[b0:b1] - out[b0:b1]).abs().max() > 1e-3
    # and each image alone gives the same features as inside the pack
    alone = _encode(model, grids[1:2], pixels[b0:b1])
    torch.testing.assert_close(alone, out[b0:b1], **EXACT)


def test_window_order_by_hand():
    # 4 x 8 patches -> 2 x 4 merged tokens; windows of 2 x 2 merged tokens -> two windows
    order, lengths = window_order(torch.tensor([[1, 4, 8]]), merge_size=2, window=2)
    blocks = [0, 1, 4, 5, 2, 3, 6, 7]  # merged ids in window order
    assert order.tolist() == [4 * b + i for b in blocks for i in range(4)]
    assert lengths == [16, 16]
    # partial windows at the border, and a second image offset by the first one's patches
    order, lengths = window_order(torch.tensor([[1, 2, 6], [1, 2, 2]]), merge_size=2, window=2)
    assert order.tolist() == list(range(8)) + list(range(8, 12)) + list(range(12, 16))
    assert lengths == [8, 4, 4]


GRIDS = [(6, 8), (4, 4)]  # merged 3 x 4 and 2 x 2


def test_no_window_and_whole_image_window_equal_full_attention():
    full = make_model()
    pixels = random_pixels(GRIDS, seed=3)
    ref = _encode(full, GRIDS, pixels)
    for keep in (True, False):
        # window of 8 merged tokens (256 px) covers both images: one window each, identity order
        big = make_model(overrides={"vision.window_size": 256, "vision.keep_window_order": keep})
        torch.testing.assert_close(_encode(big, GRIDS, pixels), ref, **EXACT)


@pytest.mark.parametrize("keep", [True, False])
def test_window_permutation_quirk(keep):
    pixels = random_pixels(GRIDS, seed=4)
    ref = _encode(make_model(), GRIDS, pixels)
    # Released default: window permutation on, every layer full attention.
    over = {
        "vision.window_size": 64,
        "vision.fullatt_block_indexes": [0, 1],
        "vision.keep_window_order": keep,
    }
    out = _encode(make_model(overrides=over), GRIDS, pixels)
    order, _ = window_order(torch.tensor([(1, h, w) for h, w in GRIDS]), 2, window=2)
    assert order.tolist() != list(range(len(order)))  # the permutation is not trivial here
    torch.testing.assert_close(out, ref[order] if keep else ref, **EXACT)


def test_windowed_layers_confine_attention_to_a_window():
    # one windowed layer: a patch's output depends only on patches of its own window
    over = {"vision.num_layers": 1, "vision.window_size": 64, "vision.keep_window_order": False}
    model = make_model(overrides=over)
    grids = [(4, 8)]  # windows: merged columns 0-1 (patches 0-7, 16-23) and 2-3
    pixels = random_pixels(grids, seed=5)
    out = _encode(model, grids, pixels)
    pixels2 = pixels.clone()
    pixels2[8:16] += 0.5  # merged tokens 2, 3: second window
    out2 = _encode(model, grids, pixels2)
    first_window = torch.tensor(list(range(0, 8)) + list(range(16, 24)))
    torch.testing.assert_close(out2[first_window], out[first_window], **EXACT)
    assert (out2[8:16] - out[8:16]).abs().max() > 1e-3
    # control: without windows the same perturbation reaches the first window
    full = make_model(overrides={"vision.num_layers": 1})
    d = _encode(full, grids, pixels2) - _encode(full, grids, pixels)
    assert d[first_window].abs().max() > 1e-6


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "overrides", [{}, {"vision.qk_normalization": True, "vision.qkv_bias": True}]
)
def test_layer_matches_explicit_formula(overrides):
    """x += ls1 * proj(attn(norm1 x)); x += ls2 * fc2(gelu(fc1(norm2 x))), written out per head."""
    import math

    from megatron_navil.reference.rope import (
        apply_rotary,
        vision_patch_positions,
        vision_rope_angles,
    )

    model = make_model(overrides={"vision.num_layers": 1, **overrides})
    cfg = model.cfg.vision
    layer = model.vision_model.encoder.layers[0]
    grids = [(2, 4)]
    pixels = random_pixels(grids, seed=6)
    got = _encode(model, grids, pixels)

    with torch.no_grad():
        x = model.vision_model.embeddings(pixels)
        c, heads = cfg.hidden_size, cfg.num_attention_heads
        hd = c // heads
        a = layer.attn
        y = _rms(x, layer.norm1.weight, cfg.norm_eps)
        qkv = y @ a.qkv.weight.T + (a.qkv.bias if cfg.qkv_bias else 0)
        q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
        if cfg.qk_normalization:  # over the full width, all heads together
            q, k = _rms(q, a.q_norm.weight, cfg.norm_eps), _rms(k, a.k_norm.weight, cfg.norm_eps)
        ang = vision_rope_angles(
            vision_patch_positions(torch.tensor([[1, 2, 4]]), 2), hd, cfg.rope_theta
        )
        outs = []
        for j in range(heads):
            sl = slice(j * hd, (j + 1) * hd)
            qj = apply_rotary(q[:, None, sl], ang)[:, 0]
            kj = apply_rotary(k[:, None, sl], ang)[:, 0]
            outs.append(torch.softmax(qj @ kj.T / math.sqrt(hd), -1) @ v[:, sl])
        x = x + layer.ls1 * (torch.cat(outs, -1) @ a.proj.weight.T + a.proj.bias)
        y = _rms(x, layer.norm2.weight, cfg.norm_eps)
        hid = y @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))  # exact GELU
        want = x + layer.ls2 * (hid @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias)
    torch.testing.assert_close(got, want, **EXACT)
