"""The LLM family objects (megatron_navil/backbones) state each family's facts correctly, and
conversion takes them from there alone.

Oracles, none of them built from the Backbone objects: the plain-PyTorch reference model's own
parameter names (megatron_navil/reference keeps independent layouts on purpose), a tiny random
`transformers` Qwen3ForCausalLM's state dict, and the values the released configs carry. Exact
comparisons (names and dict values, no tolerance). A third family defined in the test (one new
Backbone, nothing else) gets a complete, strict mapping from the production registry.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from megatron_navil.backbones import (
    BACKBONE_NAMES,
    FAMILIES,
    LLMNames,
    by_released_architecture,
    by_template,
    expert_name,
    get_backbone,
    identify,
)
from megatron_navil.config import get_flavor
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import (
    backbone_of,
    from_hf_config,
    hf_llm_config,
    llm_shape_from_hf,
    to_hf_config,
)
from megatron_navil.conversion.registry import llm_mappings

FLAVOR = {"internlm2": "debug-internlm2", "qwen3": "debug-qwen3"}


def _names(names: LLMNames, layers: int, visual: bool) -> set[str]:
    """Every LLM parameter name of a family's checkpoint (text weights, or visual experts too)."""
    flat = [names.embed, names.head, names.final_norm, names.attn_norm, names.ffn_norm]
    per_expert = [*names.qkv, names.proj, *names.gate_up, names.down]
    per_expert += [n for n in (names.q_norm, names.k_norm) if n]
    out = set(flat)
    for ve in (False, True) if visual else (False,):
        out |= {expert_name(n, ve) for n in per_expert}
    return {n.replace("*", str(i)) for n in out for i in range(layers)}


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_names_are_the_reference_models_own(backbone):
    """Our reference LLM (independent layouts) has exactly the parameters the family names."""
    from megatron_navil.reference.llm import LanguageModel

    cfg = get_flavor(FLAVOR[backbone])
    ref = LanguageModel(cfg.llm, cfg.experts)
    assert set(ref.state_dict()) == _names(get_backbone(backbone).names, cfg.llm.num_layers, True)


def test_qwen3_names_are_transformers_own():
    """transformers' Qwen3ForCausalLM (an outside implementation) has exactly the text names."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
        )
    )
    keys = {k for k in hf.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    assert keys == _names(get_backbone("qwen3").names, 2, False)


@pytest.mark.parametrize(
    "backbone, repo, arch, template",
    [
        ("internlm2", "OpenGVLab/NaViL-2B", "InternLM2VEForCausalLM", "internlm2-chat"),
        ("qwen3", "OpenGVLab/NaViL-9B", "Qwen3VEForCausalLM", "qwen3-chat"),
    ],
)
def test_release_facts_and_lookups(backbone, repo, arch, template):
    """The released repository, architecture and template of each family (values from the hub
    configs), and every lookup finds the family from them."""
    family = get_backbone(backbone)
    assert (family.released_repo, family.released_architecture) == (repo, arch)
    assert family.template == template == get_flavor(FLAVOR[backbone]).template
    assert by_released_architecture(arch) is family and by_template(template) is family
    assert identify({"architectures": [arch]}) is family
    plain = {"internlm2": "InternLM2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[backbone]
    assert identify({"architectures": [plain]}) is family
    assert identify({"model_type": backbone}) is family


def test_unknown_families_are_refused_by_name():
    with pytest.raises(KeyError, match="supported: internlm2, qwen3"):
        get_backbone("llama")
    with pytest.raises(ConversionError, match="'LlamaForCausalLM llama'.*InternLM2 and Qwen3"):
        backbone_of({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


@pytest.mark.parametrize("flavor", ["debug-internlm2", "debug-qwen3", "navil-2b", "navil-9b"])
def test_llm_config_both_ways(flavor):
    """llm_config written from a flavor reads back to the same LLM shape, through the one reader
    that llm-to-navil uses too; the family's own keys are written (InternLM2 `bias`, Qwen3
    `head_dim` + `attention_bias`)."""
    cfg = get_flavor(flavor)
    family = get_backbone(cfg.llm.backbone)
    lm = hf_llm_config(cfg.llm, "bfloat16")
    assert lm == to_hf_config(cfg, "bfloat16")["llm_config"]
    assert ("head_dim" in lm) == (family.name == "qwen3")
    assert ("bias" in lm) == (family.name == "internlm2")
    shape = llm_shape_from_hf(lm, family, "llm_config.")
    assert shape == {k: getattr(cfg.llm, k) for k in shape}
    assert from_hf_config(to_hf_config(cfg, "bfloat16")) == cfg


def test_absent_keys_get_the_familys_transformers_defaults():
    lm = hf_llm_config(get_flavor("debug-qwen3").llm)
    for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
        del lm[key]
    shape = llm_shape_from_hf(lm, get_backbone("qwen3"), "llm_config.")
    assert (shape["rope_theta"], shape["norm_eps"], shape["init_method_std"]) == (1e4, 1e-6, 0.02)
    del lm["num_hidden_layers"]
    with pytest.raises(ConversionError, match=r"^llm_config\.num_hidden_layers is missing$"):
        llm_shape_from_hf(lm, get_backbone("qwen3"), "llm_config.")


def test_a_third_family_is_one_backbone(monkeypatch):
    """A family defined only as a Backbone (other key names, separate q/k/v, no q/k norm) gets a
    mapping of every LLM parameter under its own names: nothing else in conversion knows it."""
    names = LLMNames(
        embed="transformer.wte.weight",
        head="lm_out.weight",
        final_norm="transformer.ln_f.weight",
        attn_norm="transformer.h.*.ln_1.weight",
        ffn_norm="transformer.h.*.ln_2.weight",
        qkv=tuple(f"transformer.h.*.attn.{x}{{ve}}.weight" for x in ("wq", "wk", "wv")),
        proj="transformer.h.*.attn.wo{ve}.weight",
        gate_up=("transformer.h.*.mlp.wg{ve}.weight", "transformer.h.*.mlp.wu{ve}.weight"),
        down="transformer.h.*.mlp.wd{ve}.weight",
    )
    third = dataclasses.replace(
        get_backbone("qwen3"), name="third", names=names, qk_layernorm=False
    )
    monkeypatch.setitem(FAMILIES, "third", third)
    cfg = get_flavor("debug-internlm2")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, backbone="third"))
    got = set()
    for m in llm_mappings(cfg, padded_vocab=cfg.llm.vocab_size):
        got |= {h.replace("*", str(i)) for h in m.hf for i in range(cfg.llm.num_layers)}
    got.discard("special_token_embedding.weight")
    want = {"language_model." + n for n in _names(names, cfg.llm.num_layers, True)}
    assert got == want
