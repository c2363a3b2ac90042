"""Whole-model properties of NaViLReference (both debug flavors, float64).

- input embedding: special-token rows replaced by special_token_embedding, then <IMG_CONTEXT>
  rows overwritten by the connector outputs in order; count mismatch -> ValueError naming both;
- pixel shuffle concatenates the 4 patches of a merge block in row-major block order;
- a packed run of several samples (with multi-scale images) equals separate runs when positions
  restart; perturbing one sample (its tokens or its image) never changes another; causality;
- routing: text-only samples never read *_ve weights (zero gradient, logits unchanged when they
  change); visual experts that copy the text weights equal a model without experts.
"Unchanged" is asserted to 1e-12 (float64 rounding of equal computations is ~1e-16); each such
test also checks that the perturbation changes what it should by far more.
"""

import pytest
import torch
from reference_helpers import EXACT, Sample, make_model, pack

from megatron_navil.reference import NaViLReference, image_token_ids, pixel_shuffle

IMAGES_A = [[(4, 4), (6, 8)]]  # one image, two scales
IMAGES_B = [[(2, 6)], [(4, 2)]]  # two single-scale images


def _run(model, samples):
    with torch.no_grad():
        return model(**pack(samples))


def test_pixel_shuffle_channel_order():
    c = 3
    x = torch.arange(8 * c).view(8, c)  # patch i has features [3i, 3i+1, 3i+2]
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 4 * c)
    # block 0 = patches 0..3 = (0,0), (0,1), (1,0), (1,1) of the block, concatenated in order
    assert y[0].tolist() == list(range(12)) and y[1].tolist() == list(range(12, 24))


def test_embedding_replacement_then_visual_scatter(flavor):
    model = make_model(flavor)
    cfg = model.cfg
    s = Sample(cfg, IMAGES_B, seed=1)
    inp = pack([s])
    ids = inp["input_ids"]
    with torch.no_grad():
        emb = model.embed(ids, inp["pixel_values"], inp["grid_thw"])
        feats = model.visual_tokens(inp["pixel_values"], inp["grid_thw"])
    first = cfg.llm.first_special_token_id
    table = model.language_model.embed
    ctx = ids == cfg.img_context_id
    special = (ids >= first) & ~ctx
    assert special.sum() > 0 and ctx.sum() == feats.shape[0]
    torch.testing.assert_close(emb[ctx], feats, **EXACT)
    torch.testing.assert_close(
        emb[special], model.special_token_embedding.weight[ids[special] - first], **EXACT
    )
    text = ids < first
    with torch.no_grad():
        torch.testing.assert_close(emb[text], table(ids[text]), **EXACT)


def test_context_count_mismatch_names_both_counts():
    model = make_model()
    inp = pack([Sample(model.cfg, IMAGES_B, seed=2)])
    n_ctx = int((inp["input_ids"] == model.cfg.img_context_id).sum())
    with pytest.raises(ValueError, match=rf"{n_ctx - 1} <IMG_CONTEXT>.*{n_ctx} merged"):
        keep = torch.ones(len(inp["input_ids"]), dtype=torch.bool)
        keep[int((inp["input_ids"] == model.cfg.img_context_id).nonzero()[0])] = False
        model(
            inp["input_ids"][keep],
            inp["position_ids"][keep],
            torch.tensor([0, int(keep.sum())]),
            inp["pixel_values"],
            inp["grid_thw"],
        )
    with pytest.raises(ValueError, match=rf"{n_ctx} <IMG_CONTEXT>.*0 visual"):
        model(inp["input_ids"], inp["position_ids"], inp["cu_seqlens"])


def test_visual_mask_is_img_context_and_img_start():
    model = make_model()
    cfg = model.cfg
    ids = torch.tensor(image_token_ids(cfg, [(2, 4)]))  # <img> C C \n <frame> </img>
    assert model.visual_mask(ids).tolist() == [True, True, True, False, False, False]


def test_packed_equals_separate_runs(flavor):
    model = make_model(flavor)
    cfg = model.cfg
    samples = [
        Sample(cfg, IMAGES_A, seed=3),
        Sample(cfg, [], seed=4),
        Sample(cfg, IMAGES_B, seed=5),
    ]
    packed = _run(model, samples)
    off = 0
    for s in samples:
        alone = _run(model, [s])
        torch.testing.assert_close(packed[off : off + len(s.ids)], alone, **EXACT)
        off += len(s.ids)
    inp = pack(samples)
    n0 = len(samples[0].ids)
    # RoPE is relative: a constant per-sample offset (positions not restarting) changes the
    # logits only through the float32 angle table's rounding ...
    inp["position_ids"] = torch.arange(len(inp["input_ids"]))
    with torch.no_grad():
        shifted = model(**inp)
    assert (shifted[n0:] - packed[n0:]).abs().max() < 1e-4
    # ... while positions that are not a shift of the restarted ones change them (control)
    inp["position_ids"] = pack(samples)["position_ids"] * 2
    with torch.no_grad():
        stretched = model(**inp)
    assert (stretched - packed).abs().max() > 1e-3


def test_samples_and_images_do_not_leak(flavor):
    model = make_model(flavor)
    a, b = Sample(model.cfg, IMAGES_A, seed=6), Sample(model.cfg, IMAGES_B, seed=7)
    base = _run(model, [a, b])
    n = len(a.ids)
    for target, other in ((b, slice(0, n)), (a, slice(n, None))):
        target.pixels = [p + 0.3 for p in target.pixels]
        changed = _run(model, [a, b])
        target.pixels = [p - 0.3 for p in target.pixels]
        torch.testing.assert_close(changed[other], base[other], **EXACT)
        assert (changed - base).abs().max() > 1e-4
    b.ids = b.ids[:2] + [(b.ids[2] + 1) % 100] + b.ids[3:]  # a text token of the later sample
    torch.testing.assert_close(_run(model, [a, b])[:n], base[:n], **EXACT)


def test_causality(flavor):
    model = make_model(flavor)
    s = Sample(model.cfg, IMAGES_A, seed=8)
    base = _run(model, [s])
    t = len(s.ids) - 3  # a text token near the end
    s.ids[t] = (s.ids[t] + 1) % 100
    out = _run(model, [s])
    torch.testing.assert_close(out[:t], base[:t], **EXACT)
    assert (out[t:] - base[t:]).abs().max() > 1e-4


def _ve_params(model):
    return {n: p for n, p in model.named_parameters() if "_ve" in n}


def test_text_only_sample_never_reads_visual_experts(flavor):
    model = make_model(flavor)
    s = Sample(model.cfg, [], seed=9, n_text=12)
    inp = pack([s])
    logits = model(**inp)
    labels = torch.roll(inp["input_ids"], -1)
    model.loss(logits, labels, input_ids=inp["input_ids"]).backward()
    ve = _ve_params(model)
    assert ve, "debug flavors have visual experts"
    for name, p in ve.items():
        assert p.grad is None or not p.grad.any(), name
    assert model.language_model.head.weight.grad.abs().sum() > 0  # control: gradients do flow
    with torch.no_grad():
        for p in ve.values():
            p.add_(0.5)
        torch.testing.assert_close(model(**inp), logits.detach(), **EXACT)


def test_visual_experts_equal_to_text_weights_match_no_experts(flavor):
    # separate output projection so a copy of the text weights is an exact no-op
    over = {"experts.output_proj_mode": "separate"}
    with_ve = make_model(flavor, over)
    without = make_model(
        flavor, {**over, "experts.attention_experts": False, "experts.ffn_experts": False}
    )
    sd = with_ve.state_dict()
    missing = without.load_state_dict(sd, strict=False)
    assert not missing.missing_keys and set(missing.unexpected_keys) == set(_ve_params(with_ve))
    with torch.no_grad():
        for name, p in _ve_params(with_ve).items():
            p.copy_(sd[name.replace("_ve", "")])
    samples = [Sample(with_ve.cfg, IMAGES_A, seed=10)]
    torch.testing.assert_close(_run(with_ve, samples), _run(without, samples), **EXACT)


def test_init_is_deterministic():
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    for (n, p), q, r in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(p, q), n
    assert any(
        not torch.equal(p, r) for p, r in zip(a.state_dict().values(), c.state_dict().values())
    )
    ls = a.vision_model.encoder.layers[0].ls1
    ls = ls.detach()
    assert abs(float(ls.mean()) - a.cfg.vision.layerscale_init) < 0.05 and ls.std() > 0


def test_text_only_forward_without_images_is_allowed():
    model = make_model("debug-qwen3")
    logits = _run(model, [Sample(model.cfg, [], seed=11)])
    assert logits.shape == (5, model.cfg.llm.vocab_size) and torch.isfinite(logits).all()
    assert isinstance(model, NaViLReference)


def test_connector_matches_explicit_formula():
    """visual tokens = Linear(GELU(Linear(LayerNorm(4 consecutive patches concatenated))))."""
    import math

    model = make_model()
    grids = torch.tensor([[1, 2, 4]])
    pixels = Sample(model.cfg, [[(2, 4)]], seed=12).pixels[0]
    with torch.no_grad():
        got = model.visual_tokens(pixels, grids)
        x = model.vision_model(pixels, grids).reshape(2, -1)  # [8, C] -> [2, 4C]
        ln, fc1, fc2 = model.mlp1[0], model.mlp1[1], model.mlp1[3]
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mu) / torch.sqrt(var + model.cfg.connector.layernorm_eps) * ln.weight + ln.bias
        x = x @ fc1.weight.T + fc1.bias
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        want = x @ fc2.weight.T + fc2.bias
    torch.testing.assert_close(got, want, **EXACT)
