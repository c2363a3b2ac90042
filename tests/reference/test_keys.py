"""state_dict keys and shapes are exactly the released HF names (navil-reference.md).

The expected table is written out here from the key patterns, independently of the model code;
a missing, extra or mis-shaped key fails; the parameter total must equal the config's own count.
Full-size flavors (navil-2b, navil-9b) are built on the meta device, so checking ~10B
parameters costs nothing.
"""

import pytest
import torch
from reference_helpers import make_cfg

from megatron_navil.reference import NaViLReference


def expected_keys(cfg) -> dict[str, tuple[int, ...]]:
    v, lm, x = cfg.vision, cfg.llm, cfg.experts
    c, p, f = v.hidden_size, v.patch_size, v.ffn_hidden_size
    d, hd, h, g = lm.hidden_size, lm.kv_channels, lm.num_attention_heads, lm.num_query_groups
    ff, vocab = lm.ffn_hidden_size, lm.vocab_size
    c4 = c * cfg.connector.merge_size**2
    k = {
        "vision_model.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "mlp1.0.weight": (c4,),
        "mlp1.0.bias": (c4,),
        "mlp1.1.weight": (d, c4),
        "mlp1.1.bias": (d,),
        "mlp1.3.weight": (d, d),
        "mlp1.3.bias": (d,),
        "special_token_embedding.weight": (12, d),
        "language_model.model.norm.weight": (d,),
    }
    for i in range(v.num_layers):
        e = f"vision_model.encoder.layers.{i}."
        k.update(
            {
                e + "norm1.weight": (c,),
                e + "norm2.weight": (c,),
                e + "attn.qkv.weight": (3 * c, c),
                e + "attn.proj.weight": (c, c),
                e + "attn.proj.bias": (c,),
                e + "ls1": (c,),
                e + "ls2": (c,),
                e + "mlp.fc1.weight": (f, c),
                e + "mlp.fc1.bias": (f,),
                e + "mlp.fc2.weight": (c, f),
                e + "mlp.fc2.bias": (c,),
            }
        )
        if v.qkv_bias:
            k[e + "attn.qkv.bias"] = (3 * c,)
        if v.qk_normalization:
            k[e + "attn.q_norm.weight"] = k[e + "attn.k_norm.weight"] = (c,)
    attn_sfx = ("", "_ve") if x.attention_experts else ("",)
    ffn_sfx = ("", "_ve") if x.ffn_experts else ("",)
    if lm.backbone == "internlm2":
        k["language_model.model.tok_embeddings.weight"] = (vocab, d)
        k["language_model.output.weight"] = (vocab, d)
        for i in range(lm.num_layers):
            e = f"language_model.model.layers.{i}."
            k[e + "attention_norm.weight"] = k[e + "ffn_norm.weight"] = (d,)
            for s in attn_sfx:
                k[e + f"attention.wqkv{s}.weight"] = ((h + 2 * g) * hd, d)
                k[e + f"attention.wo{s}.weight"] = (d, h * hd)
            for s in ffn_sfx:
                k[e + f"feed_forward{s}.w1.weight"] = k[e + f"feed_forward{s}.w3.weight"] = (ff, d)
                k[e + f"feed_forward{s}.w2.weight"] = (d, ff)
    else:
        k["language_model.model.embed_tokens.weight"] = (vocab, d)
        k["language_model.lm_head.weight"] = (vocab, d)
        for i in range(lm.num_layers):
            e = f"language_model.model.layers.{i}."
            k[e + "input_layernorm.weight"] = k[e + "post_attention_layernorm.weight"] = (d,)
            for s in attn_sfx:
                k[e + f"self_attn.q_proj{s}.weight"] = (h * hd, d)
                k[e + f"self_attn.k_proj{s}.weight"] = k[e + f"self_attn.v_proj{s}.weight"] = (
                    g * hd,
                    d,
                )
                k[e + f"self_attn.o_proj{s}.weight"] = (d, h * hd)
                if lm.qk_layernorm:
                    k[e + f"self_attn.q_norm{s}.weight"] = k[e + f"self_attn.k_norm{s}.weight"] = (
                        hd,
                    )
            for s in ffn_sfx:
                k[e + f"mlp{s}.gate_proj.weight"] = k[e + f"mlp{s}.up_proj.weight"] = (ff, d)
                k[e + f"mlp{s}.down_proj.weight"] = (d, ff)
    return k


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


@pytest.mark.parametrize("flavor", ["debug-internlm2", "debug-qwen3", "navil-2b", "navil-9b"])
def test_keys_and_shapes(flavor):
    cfg = make_cfg(flavor)
    with torch.device("meta"):
        model = NaViLReference(cfg)
    got, want = _shapes(model), expected_keys(cfg)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want


@pytest.mark.parametrize(
    "overrides",
    [
        {"experts.attention_experts": False},
        {"experts.ffn_experts": False},
        {"vision.qkv_bias": True, "vision.qk_normalization": True},
    ],
)
@pytest.mark.parametrize("flavor", ["debug-internlm2", "debug-qwen3"])
def test_optional_keys_follow_the_config(flavor, overrides):
    cfg = make_cfg(flavor, overrides)
    with torch.device("meta"):
        model = NaViLReference(cfg)
    assert _shapes(model) == expected_keys(cfg)


def test_qwen3_without_qk_norm_and_internlm2_rejects_it():
    cfg = make_cfg("debug-qwen3", {"llm.qk_layernorm": False})
    with torch.device("meta"):
        assert _shapes(NaViLReference(cfg)) == expected_keys(cfg)
    with pytest.raises(ValueError, match="qk_layernorm"):
        NaViLReference(make_cfg("debug-internlm2", {"llm.qk_layernorm": True}))


@pytest.mark.parametrize("flavor", ["debug-internlm2", "debug-qwen3", "navil-2b", "navil-9b"])
def test_parameter_count_matches_config_arithmetic(flavor):
    # cross-check of NaViLModelConfig.num_parameters (used for sizing) against the real modules
    cfg = make_cfg(flavor)
    with torch.device("meta"):
        model = NaViLReference(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()[0]
