"""NaViLModelConfig <-> HF config.json: exact round trip, release semantics, clear errors.

- every flavor and the variants that exercise each field (windows, experts off, q/k norms,
  output-projection modes) survive config -> config.json -> config exactly (dataclass equality),
  through real JSON text;
- the release fields carry the values a NaViL user expects (navil_chat, navil_vit, the
  InternLM2VE / Qwen3VE architecture, downsample_ratio 0.5, window_size in PATCHES);
- a released-style config.json (no `megatron_navil` section) is read with the release's
  semantics (window in patches, null fullatt = all layers + window-order quirk, composed vs
  separate projection by backbone), the special-token start from the tokenizer files;
- an LLM config that leaves out rope_theta / rms_norm_eps / initializer_range gets what
  transformers' own config classes default to (Qwen3Config, asked here; InternLM2Config's are
  the same), in both readers: a NaViL config.json's llm_config and llm-to-navil's plain LLM;
- malformed configs raise ConversionError naming the field.
Exact comparisons: configs are plain values.
"""

import json

import pytest

from megatron_navil.config import get_flavor
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import EXTENSION, from_hf_config, to_hf_config
from megatron_navil.conversion.to_megatron import load_hf_config

VARIANTS = [
    ("navil-2b", {}),
    ("navil-9b", {}),
    ("debug-internlm2", {}),
    ("debug-qwen3", {}),
    (
        "debug-internlm2",
        {
            "vision.window_size": 64,
            "vision.fullatt_block_indexes": [1],
            "vision.keep_window_order": True,
        },
    ),
    ("debug-qwen3", {"experts.attention_experts": False, "experts.output_proj_mode": "composed"}),
    (
        "debug-internlm2",
        {
            "experts.ffn_experts": False,
            "experts.visual_init": "random",
            "vision.qk_normalization": True,
            "vision.qkv_bias": True,
        },
    ),
    (
        "debug-qwen3",
        {
            "llm.qk_layernorm": False,
            "llm.rope_theta": 5e5,
            "vision.rope_theta": 1e3,
            "connector.layernorm_eps": 1e-6,
            "llm.make_vocab_size_divisible_by": 64,
        },
    ),
]


@pytest.mark.parametrize("flavor,overrides", VARIANTS)
def test_round_trip_is_exact(flavor, overrides):
    cfg = get_flavor(flavor).apply_overrides(overrides)
    text = json.dumps(to_hf_config(cfg, "bfloat16"))
    assert from_hf_config(json.loads(text)) == cfg


def test_release_fields():
    d = to_hf_config(
        get_flavor("navil-9b").apply_overrides({"vision.window_size": 128}), "bfloat16"
    )
    assert d["architectures"] == ["NaViL"] and d["model_type"] == "navil_chat"
    assert d["vision_config"]["model_type"] == "navil_vit"
    assert d["vision_config"]["window_size"] == 8  # 128 px / 16 px patches
    assert d["llm_config"]["architectures"] == ["Qwen3VEForCausalLM"]
    assert d["llm_config"]["head_dim"] == 128 and d["llm_config"]["num_key_value_heads"] == 8
    assert (
        d["downsample_ratio"],
        d["scale_downsample_ratio"],
        d["select_layer"],
        d["ps_version"],
        d["anyres_image_size"],
    ) == (0.5, 0.7071, -1, "v2", True)
    d2 = to_hf_config(get_flavor("navil-2b"), "bfloat16")
    assert d2["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert d2["llm_config"]["vocab_size"] == 92556


def _released(backbone: str) -> dict:
    d = to_hf_config(get_flavor("navil-2b" if backbone == "internlm2" else "navil-9b"), "bfloat16")
    del d[EXTENSION]
    d["vision_config"].update(window_size=8, fullatt_block_indexes=None)
    return d


def test_released_config_semantics(tmp_path):
    cfg = from_hf_config(_released("internlm2"), first_special_token_id=92544)
    assert cfg.vision.window_size == 128 and cfg.vision.keep_window_order
    assert cfg.vision.fullatt_block_indexes == tuple(range(cfg.vision.num_layers))
    assert cfg.experts.output_proj_mode == "composed" and not cfg.llm.qk_layernorm
    q = from_hf_config(_released("qwen3"), first_special_token_id=151669)
    assert q.experts.output_proj_mode == "separate" and q.llm.qk_layernorm
    # Without the extension section the special-token start comes from the tokenizer files.
    (tmp_path / "config.json").write_text(json.dumps(_released("qwen3")))
    (tmp_path / "added_tokens.json").write_text(
        json.dumps({"</box>": 151669, "<box>": 151670, "<IMG_CONTEXT>": 151671})
    )
    assert load_hf_config(tmp_path).llm.first_special_token_id == 151669


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(model_type="qwen3"), "model_type 'qwen3', not 'navil_chat'"),
        (lambda d: d["llm_config"].pop("hidden_size"), "llm_config.hidden_size is missing"),
        (
            lambda d: d["llm_config"].update(
                architectures=["LlamaForCausalLM"], model_type="llama"
            ),
            "supported LLM backbones are InternLM2 and Qwen3",
        ),
        (lambda d: d.update(select_layer=-2), "select_layer = -2 is not supported"),
        (lambda d: d[EXTENSION].pop("first_special_token_id"), "pass --first-special-token-id"),
        (lambda d: d["llm_config"].update(num_key_value_heads=3), "num_query_groups"),
    ],
)
def test_bad_configs_name_the_field(edit, message):
    d = to_hf_config(get_flavor("debug-qwen3"), "float32")
    edit(d)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf_config(d)


def test_absent_llm_fields_get_transformers_defaults(tmp_path, cli):
    from transformers import Qwen3Config

    from megatron_navil.checkpoint import read_metadata
    from megatron_navil.config import NaViLModelConfig
    from tests.checkpoint_tools.plain_llm import make_llm_dir

    hf = Qwen3Config()
    want = (hf.rope_theta, hf.rms_norm_eps, hf.initializer_range)
    keys = ("rope_theta", "rms_norm_eps", "initializer_range")
    d = _released("qwen3")
    for k in keys:
        d["llm_config"].pop(k, None)
    llm = from_hf_config(d, first_special_token_id=151669).llm
    assert (llm.rope_theta, llm.norm_eps, llm.init_method_std) == want
    # llm-to-navil with a flavor whose value differs (debug-internlm2: norm_eps 1e-5): where the
    # file is silent, transformers' default, not the flavor's.
    c, _ = make_llm_dir(tmp_path / "llm", "internlm2")
    for k in keys:
        c.pop(k)
    (tmp_path / "llm/config.json").write_text(json.dumps(c))
    rc, _, err = cli(
        [
            "llm-to-navil",
            "--hf-llm",
            tmp_path / "llm",
            "--flavor",
            "debug-internlm2",
            "--output",
            tmp_path / "ck",
            "--no-progress",
        ]
    )
    assert rc == 0, err
    got = NaViLModelConfig.from_dict(read_metadata(tmp_path / "ck")["model"]).llm
    assert (got.rope_theta, got.norm_eps, got.init_method_std) == want
