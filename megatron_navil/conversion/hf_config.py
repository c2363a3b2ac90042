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
- experts on in attention and FFN; the output projection mode, per-head q/k norm and template
  are the LLM family's (megatron_navil/backbones: InternLM2 `composed`, Qwen3 `separate` + q/k
  norm).
- the first special-token id is not in config.json (the release reads it from the tokenizer):
  the caller passes it (navil-convert finds it in the directory's tokenizer files).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_navil.backbones import FAMILIES, Backbone, get_backbone, identify
from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertConfig,
    LLMConfig,
    NaViLModelConfig,
    VisionConfig,
)
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.released import auto_map, raster_window_patches

EXTENSION = "megatron_navil"
TOP, VISION, LLM = "config.json: ", "config.json: vision_config.", "config.json: llm_config."
"""Where a key of a NaViL config.json sits, as error messages name it (a prefix of the key)."""


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
    lm = hf_llm_config(llm, torch_dtype)
    return {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "torch_dtype": torch_dtype,
        "auto_map": auto_map(get_backbone(llm.backbone), local=local_code),
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


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    """`d[key]`, or `default`; without a default a missing key is an error naming it
    (`where` + key: `where` is the file and section prefix, e.g. VISION)."""
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConversionError(f"{where}{key} is missing")
    return default


def hf_llm_config(llm: LLMConfig, torch_dtype: Optional[str] = None) -> dict[str, Any]:
    """The HF `llm_config` of an LLM section (usual HF names, plus the family's own keys)."""
    family = get_backbone(llm.backbone)
    lm = {
        "architectures": [family.released_architecture],
        "model_type": family.hf_model_type,
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
    }
    if torch_dtype is not None:
        lm["torch_dtype"] = torch_dtype
    if family.head_dim_key:
        lm[family.head_dim_key] = llm.kv_channels
    return {**lm, **family.hf_config_extras}


def backbone_of(llm_config: dict) -> Backbone:
    """The LLM family an HF LLM config describes; ConversionError when it is none of ours."""
    family = identify(llm_config)
    if family is None:
        names = " ".join(llm_config.get("architectures") or [])
        names += " " + str(llm_config.get("model_type", ""))
        supported = " and ".join(b.display_name for b in FAMILIES.values())
        raise ConversionError(
            f"config.json: llm_config describes {names.strip()!r}; supported LLM "
            f"backbones are {supported}"
        )
    return family


def llm_shape_from_hf(c: dict, family: Backbone, where: str) -> dict[str, Any]:
    """The shape fields of an LLM section from an HF LLM config (`c`), the one reader of both a
    NaViL llm_config and a plain LLM's config.json: the usual HF names, transformers' defaults
    of the family where a key is absent (rope_theta, rms_norm_eps, initializer_range)."""
    heads = _get(c, "num_attention_heads", where)
    hidden = _get(c, "hidden_size", where)
    head_dim = c.get(family.head_dim_key) if family.head_dim_key else None
    return dict(
        num_layers=_get(c, "num_hidden_layers", where),
        hidden_size=hidden,
        ffn_hidden_size=_get(c, "intermediate_size", where),
        num_attention_heads=heads,
        num_query_groups=_get(c, "num_key_value_heads", where, heads),
        kv_channels=head_dim or hidden // heads,
        qk_layernorm=family.qk_layernorm,
        rope_theta=float(family.hf_value(c, "rope_theta")),
        norm_eps=float(family.hf_value(c, "rms_norm_eps")),
        init_method_std=float(family.hf_value(c, "initializer_range")),
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
    vd, ld = _get(d, "vision_config", TOP), _get(d, "llm_config", TOP)
    ext = d.get(EXTENSION) or {}
    family = backbone_of(ld)
    first = ext.get("first_special_token_id", first_special_token_id)
    if first is None:
        raise ConversionError(
            "config.json does not say where the special tokens start and no "
            "tokenizer file lists </box>; pass --first-special-token-id"
        )
    patch = _get(vd, "patch_size", VISION)
    layers = _get(vd, "num_hidden_layers", VISION)
    window = _get(vd, "window_size", VISION, 0) * patch
    full = vd.get("fullatt_block_indexes")
    if "window_size" in ext:  # ours: the model's own window, whatever the released field says
        window, full = ext["window_size"], ext.get("fullatt_block_indexes", [])
    shape = llm_shape_from_hf(ld, family, LLM)
    if "kv_channels" in ext:  # ours: exact even where the family writes no head_dim
        shape["kv_channels"] = ext["kv_channels"]
    shape["qk_layernorm"] = bool(ext.get("qk_layernorm", family.qk_layernorm))
    try:
        cfg = NaViLModelConfig(
            vision=VisionConfig(
                hidden_size=_get(vd, "hidden_size", VISION),
                num_layers=layers,
                num_attention_heads=_get(vd, "num_attention_heads", VISION),
                ffn_hidden_size=_get(vd, "intermediate_size", VISION),
                patch_size=patch,
                num_channels=_get(vd, "num_channels", VISION, 3),
                qkv_bias=bool(_get(vd, "qkv_bias", VISION, False)),
                qk_normalization=bool(_get(vd, "qk_normalization", VISION, False)),
                layerscale_init=float(_get(vd, "initializer_factor", VISION, 0.1)),
                norm_eps=float(_get(vd, "layer_norm_eps", VISION, 1e-6)),
                rope_theta=float(ext.get("vision_rope_theta", 10000.0)),
                window_size=window,
                fullatt_block_indexes=tuple(full)
                if full is not None
                else tuple(range(layers))
                if window
                else (),
                keep_window_order=bool(ext.get("keep_window_order", window > 0)),
                init_method_std=float(_get(vd, "initializer_range", VISION, 0.02)),
            ),
            connector=ConnectorConfig(
                merge_size=round(1.0 / _get(d, "downsample_ratio", TOP, 0.5)),
                layernorm_eps=float(ext.get("connector_layernorm_eps", 1e-5)),
            ),
            llm=LLMConfig(
                backbone=family.name,
                **shape,
                vocab_size=_get(ld, "vocab_size", LLM),
                first_special_token_id=int(first),
                max_sequence_length=_get(ld, "max_position_embeddings", LLM, 8192),
                make_vocab_size_divisible_by=ext.get("make_vocab_size_divisible_by", 128),
            ),
            experts=ExpertConfig(
                attention_experts=ext.get("attention_experts", True),
                ffn_experts=ext.get("ffn_experts", True),
                output_proj_mode=ext.get("output_proj_mode", family.output_proj_mode),
                visual_init=ext.get("visual_init", "copy"),
            ),
            min_dynamic_patch=_get(d, "min_dynamic_patch", TOP, 256),
            max_dynamic_patch=_get(d, "max_dynamic_patch", TOP, 24576),
            scale_downsample_ratio=float(_get(d, "scale_downsample_ratio", TOP, 0.7071)),
            template=_get(d, "template", TOP, family.template),
        )
        cfg.validate()
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"config.json describes a model we cannot build: {e}") from None
    return cfg
