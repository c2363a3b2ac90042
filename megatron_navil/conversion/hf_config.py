"""NaViLModelConfig <-> the released HF `config.json` (model_type `navil_chat`).

The released fields are the source of truth: `vision_config` (model_type `navil_vit`, InternViT
names), `llm_config` (InternLM2VEForCausalLM / Qwen3VEForCausalLM with their usual HF names) and
the top-level image fields. What the release has no field for (special-token position, expert
switches, the window-order quirk and our own window, vocab padding, ...) goes into a
`megatron_navil` section, so NaViLModelConfig -> config.json -> NaViLModelConfig is exact.
Our export also writes what the released code needs to load it (`auto_map`, a window under
which its window order is right: conversion/release.py). A released config.json has no such
section; reading it uses the release's own semantics:

- `vision_config.window_size` counts PATCHES in the release (ours: pixels = patches x patch_size);
  `fullatt_block_indexes: null` means every layer attends fully, and the released encoder still
  permutes patches into window order (our `keep_window_order = true`), see docs/model.md.
- experts on in attention and FFN; output projection `composed` (InternLM2, 2B) or `separate`
  (Qwen3, 9B); per-head q/k norm for Qwen3 only.
- the first special-token id is not in config.json (the release reads it from the tokenizer):
  the caller passes it (navil-convert finds it in the directory's tokenizer files).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertConfig,
    LLMConfig,
    NaViLModelConfig,
    VisionConfig,
)
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.released import LLM_ARCHITECTURES, auto_map, raster_window_patches

EXTENSION = "megatron_navil"


def to_hf_config(
    cfg: NaViLModelConfig, torch_dtype: str, local_code: bool = False
) -> dict[str, Any]:
    """The HF config.json dict of a model whose weights are stored as `torch_dtype`.

    `auto_map` points at the released code of the LLM family on the hub, or (`local_code`) at
    copies of it beside config.json. The vision `window_size` is the model's own when it was
    trained in the released window order (`keep_window_order`); a model trained in row order
    gets a window wider than any admissible image, under which the released code's window
    order is the identity (conversion/release.py)."""
    v, llm, e = cfg.vision, cfg.llm, cfg.experts
    windowed = v.window_size > 0
    unit = v.patch_size * cfg.connector.merge_size
    vision = {
        "model_type": "navil_vit",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.ffn_hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "patch_size": v.patch_size,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_normalization,
        "norm_type": "rms_norm",
        "layer_norm_eps": v.norm_eps,
        "hidden_act": "gelu",
        "initializer_factor": v.layerscale_init,
        "initializer_range": v.init_method_std,
        "window_size": v.window_size // v.patch_size if windowed else raster_window_patches(cfg),
        # null = every layer attends fully (release semantics); only meaningful with windows
        "fullatt_block_indexes": list(v.fullatt_block_indexes) if windowed else None,
        "image_size": unit,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "torch_dtype": torch_dtype,
    }
    lm = {
        "architectures": [LLM_ARCHITECTURES[llm.backbone]],
        "model_type": llm.backbone,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_query_groups,
        "num_hidden_layers": llm.num_layers,
        "rms_norm_eps": llm.norm_eps,
        "rope_theta": llm.rope_theta,
        "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_sequence_length,
        "hidden_act": "silu",
        "initializer_range": llm.init_method_std,
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "torch_dtype": torch_dtype,
    }
    if llm.backbone == "internlm2":
        lm["bias"] = False
    else:
        lm.update(head_dim=llm.kv_channels, attention_bias=False)
    return {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "torch_dtype": torch_dtype,
        "auto_map": auto_map(llm.backbone, local=local_code),
        "vision_config": vision,
        "llm_config": lm,
        "force_image_size": unit,
        "downsample_ratio": 1.0 / cfg.connector.merge_size,
        "scale_downsample_ratio": cfg.scale_downsample_ratio,
        "min_dynamic_patch": cfg.min_dynamic_patch,
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "anyres_image_size": True,
        "template": cfg.template,
        "select_layer": -1,
        "ps_version": "v2",
        "use_thumbnail": False,
        "tie_word_embeddings": False,
        EXTENSION: {
            "format_version": 1,
            "first_special_token_id": llm.first_special_token_id,
            "qk_layernorm": llm.qk_layernorm,
            "kv_channels": llm.kv_channels,
            "make_vocab_size_divisible_by": llm.make_vocab_size_divisible_by,
            "attention_experts": e.attention_experts,
            "ffn_experts": e.ffn_experts,
            "output_proj_mode": e.output_proj_mode,
            "visual_init": e.visual_init,
            "keep_window_order": v.keep_window_order,
            "vision_rope_theta": v.rope_theta,
            # our own window (pixels; 0 = none): vision_config.window_size may be the wide
            # identity window of a row-order model
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "connector_layernorm_eps": cfg.connector.layernorm_eps,
        },
    }


HF_LLM_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02}
"""What transformers uses when an LLM config.json leaves these out: the defaults of
Qwen3Config (transformers 4.51) and of InternLM2's InternLM2Config, equal for these keys. Both
readers (a NaViL config's llm_config here, a plain LLM's config.json in llm-to-navil) fall back
to them, so a converted model runs what transformers would run from the same file."""


def hf_llm_value(c: dict, key: str) -> Any:
    """`c[key]` of an HF LLM config, or transformers' default (HF_LLM_DEFAULTS) when absent."""
    value = c.get(key)
    return HF_LLM_DEFAULTS[key] if value is None else value


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConversionError(f"config.json: {where}.{key} is missing; is this a NaViL HF config?")
    return default


def backbone_of(llm_config: dict) -> str:
    names = (
        " ".join(llm_config.get("architectures") or [])
        + " "
        + str(llm_config.get("model_type", ""))
    )
    for backbone, arch in (("internlm2", "internlm2"), ("qwen3", "qwen3")):
        if arch in names.lower():
            return backbone
    raise ConversionError(
        f"config.json: llm_config describes {names.strip()!r}; supported LLM "
        "backbones are InternLM2 and Qwen3"
    )


def from_hf_config(d: dict, first_special_token_id: Optional[int] = None) -> NaViLModelConfig:
    """The model config of an HF NaViL config.json dict (ours or a released one)."""
    if d.get("model_type") != "navil_chat":
        raise ConversionError(
            f"config.json has model_type {d.get('model_type')!r}, not 'navil_chat': "
            "not a NaViL HF directory (for a plain LLM use llm-to-navil)"
        )
    for key, want in (("select_layer", -1), ("ps_version", "v2")):
        if d.get(key, want) != want:
            raise ConversionError(
                f"config.json: {key} = {d[key]!r} is not supported (only {want!r})"
            )
    vd, ld = _get(d, "vision_config", "config"), _get(d, "llm_config", "config")
    ext = d.get(EXTENSION) or {}
    backbone = backbone_of(ld)
    first = ext.get("first_special_token_id", first_special_token_id)
    if first is None:
        raise ConversionError(
            "config.json does not say where the special tokens start and no "
            "tokenizer file lists </box>; pass --first-special-token-id"
        )
    patch = _get(vd, "patch_size", "vision_config")
    layers = _get(vd, "num_hidden_layers", "vision_config")
    window = _get(vd, "window_size", "vision_config", 0) * patch
    full = vd.get("fullatt_block_indexes")
    if "window_size" in ext:  # ours: the model's own window, whatever the released field says
        window, full = ext["window_size"], ext.get("fullatt_block_indexes", [])
    heads = _get(ld, "num_attention_heads", "llm_config")
    hidden = _get(ld, "hidden_size", "llm_config")
    try:
        cfg = NaViLModelConfig(
            vision=VisionConfig(
                hidden_size=_get(vd, "hidden_size", "vision_config"),
                num_layers=layers,
                num_attention_heads=_get(vd, "num_attention_heads", "vision_config"),
                ffn_hidden_size=_get(vd, "intermediate_size", "vision_config"),
                patch_size=patch,
                num_channels=_get(vd, "num_channels", "vision_config", 3),
                qkv_bias=bool(_get(vd, "qkv_bias", "vision_config", False)),
                qk_normalization=bool(_get(vd, "qk_normalization", "vision_config", False)),
                layerscale_init=float(_get(vd, "initializer_factor", "vision_config", 0.1)),
                norm_eps=float(_get(vd, "layer_norm_eps", "vision_config", 1e-6)),
                rope_theta=float(ext.get("vision_rope_theta", 10000.0)),
                window_size=window,
                fullatt_block_indexes=tuple(full)
                if full is not None
                else tuple(range(layers))
                if window
                else (),
                keep_window_order=bool(ext.get("keep_window_order", window > 0)),
                init_method_std=float(_get(vd, "initializer_range", "vision_config", 0.02)),
            ),
            connector=ConnectorConfig(
                merge_size=round(1.0 / _get(d, "downsample_ratio", "config", 0.5)),
                layernorm_eps=float(ext.get("connector_layernorm_eps", 1e-5)),
            ),
            llm=LLMConfig(
                backbone=backbone,
                num_layers=_get(ld, "num_hidden_layers", "llm_config"),
                hidden_size=hidden,
                ffn_hidden_size=_get(ld, "intermediate_size", "llm_config"),
                num_attention_heads=heads,
                num_query_groups=_get(ld, "num_key_value_heads", "llm_config", heads),
                kv_channels=ext.get(
                    "kv_channels", _get(ld, "head_dim", "llm_config", hidden // heads)
                ),
                qk_layernorm=bool(ext.get("qk_layernorm", backbone == "qwen3")),
                vocab_size=_get(ld, "vocab_size", "llm_config"),
                first_special_token_id=int(first),
                rope_theta=float(hf_llm_value(ld, "rope_theta")),
                norm_eps=float(hf_llm_value(ld, "rms_norm_eps")),
                max_sequence_length=_get(ld, "max_position_embeddings", "llm_config", 8192),
                init_method_std=float(hf_llm_value(ld, "initializer_range")),
                make_vocab_size_divisible_by=ext.get("make_vocab_size_divisible_by", 128),
            ),
            experts=ExpertConfig(
                attention_experts=ext.get("attention_experts", True),
                ffn_experts=ext.get("ffn_experts", True),
                output_proj_mode=ext.get(
                    "output_proj_mode", "composed" if backbone == "internlm2" else "separate"
                ),
                visual_init=ext.get("visual_init", "copy"),
            ),
            min_dynamic_patch=_get(d, "min_dynamic_patch", "config", 256),
            max_dynamic_patch=_get(d, "max_dynamic_patch", "config", 24576),
            scale_downsample_ratio=float(_get(d, "scale_downsample_ratio", "config", 0.7071)),
            template=_get(
                d,
                "template",
                "config",
                "internlm2-chat" if backbone == "internlm2" else "qwen3-chat",
            ),
        )
        cfg.validate()
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"config.json describes a model we cannot build: {e}") from None
    return cfg
