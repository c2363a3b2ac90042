"""Whether an HF directory loads with the released NaViL modelling code: one line per problem.

The facts checked (auto_map, window order, admissible images, templates, special tokens) are
in released.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from megatron_navil.backbones import FAMILIES, by_released_architecture
from megatron_navil.config.model import SPECIAL_TOKENS
from megatron_navil.conversion.hf_config import EXTENSION, from_hf_config
from megatron_navil.conversion.released import (
    AUTO_MAP,
    RELEASED_TEMPLATES,
    REQUIRED_LLM,
    REQUIRED_TOP,
    REQUIRED_VISION,
    raster_window_patches,
    widest_merged_tokens,
)


def _load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_config(d: dict) -> list[str]:
    """Problems the released code would hit with this config.json dict (one line each:
    `field: what is wrong; the fix`). Empty when it loads."""
    out = []
    for key in REQUIRED_TOP:
        if d.get(key) is None:
            out.append(
                f"{key}: missing; the released NaViLChatConfig reads it (re-export with "
                "navil-convert navil-to-hf)"
            )
    if d.get("model_type") not in (None, "navil_chat"):
        out.append(f"model_type: {d['model_type']!r}; the released code registers 'navil_chat'")
    if d.get("architectures") not in (None, ["NaViL"]):
        out.append(f'architectures: {d["architectures"]!r}; the release uses ["NaViL"]')
    vision, llm = d.get("vision_config") or {}, d.get("llm_config") or {}
    out += [
        f"vision_config.{k}: missing; the released vision config defaults it to another "
        "model's value, write it explicitly"
        for k in REQUIRED_VISION
        if vision.get(k) is None
    ]
    out += [
        f"llm_config.{k}: missing; the released LLM config defaults it to another model's "
        "value, write it explicitly"
        for k in REQUIRED_LLM
        if llm.get(k) is None
    ]
    arch = (llm.get("architectures") or [None])[0]
    family = by_released_architecture(arch)
    if llm and family is None:
        accepted = " or ".join(b.released_architecture for b in FAMILIES.values())
        out.append(f"llm_config.architectures: {arch!r}; the released code accepts {accepted}")
    if d.get("template") is not None and d["template"] not in RELEASED_TEMPLATES:
        out.append(
            f"template: {d['template']!r} is not a released conversation template; use one "
            f"of {', '.join(RELEASED_TEMPLATES)} (internlm2-chat / qwen3-chat)"
        )
    if vision.get("qk_normalization") and (vision.get("num_attention_heads") or 1) > 1:
        out.append(
            "vision_config.qk_normalization: true with "
            f"{vision['num_attention_heads']} heads; the released encoder applies the "
            "full-width q/k norm to per-head tensors and fails unless there is 1 head: "
            "such a model cannot run in the released code"
        )
    out += _window_problems(d, vision)
    amap = d.get("auto_map") or {}
    for key, target in AUTO_MAP.items():
        ref = amap.get(key)
        if amap and ref is None:
            out.append(f"auto_map.{key}: missing; it must name {target}")
        elif ref is not None and ref.split("--")[-1] != target:
            out.append(f"auto_map.{key}: {ref!r} does not name the released {target}")
        elif (
            ref is not None
            and "--" in ref
            and family is not None
            and ref.split("--")[0] != family.released_repo
        ):
            out.append(
                f"auto_map.{key}: {ref.split('--')[0]} does not hold the {family.name} code; "
                f"use {family.released_repo}"
            )
    ext = d.get(EXTENSION) or {}
    if ext.get("attention_experts") is False or ext.get("ffn_experts") is False:
        out.append(
            f"{EXTENSION}.attention_experts/ffn_experts: the released code always has "
            "modality experts in attention and FFN; a model without them cannot be released "
            "in this format"
        )
    return out


def _window_problems(d: dict, vision: dict) -> list[str]:
    window = vision.get("window_size")
    merge = round(1.0 / d.get("downsample_ratio", 0.5))
    if window is None:
        return []
    if window // merge <= 0:
        return [
            f"vision_config.window_size: {window} patches; the released encoder asserts "
            f"window_size // {merge} > 0 on every image (re-export: raster-order models get a "
            "window wider than any image)"
        ]
    ext = d.get(EXTENSION) or {}
    if ext.get("keep_window_order", True):
        return []  # trained in the released window order: its own window is right
    if (ext.get("window_size") or 0) > 0:
        return [
            "megatron_navil.keep_window_order: false with window attention; the released "
            "encoder keeps merged tokens in window order, so the LLM would see another order "
            "than in training: train with vision.keep_window_order=true to release"
        ]
    try:
        cfg = from_hf_config(d)
    except Exception:  # the field problems are reported above
        return []
    need = raster_window_patches(cfg)
    if window < need:
        return [
            f"vision_config.window_size: {window} patches; the model was trained in row order "
            f"and the widest admissible image is {widest_merged_tokens(cfg)} merged tokens "
            f"wide, so the released window order is the identity only from {need} patches: "
            f"set it to {need} (navil-convert navil-to-hf does)"
        ]
    return []


def check_release(hf_dir: Path) -> list[str]:
    """Every constraint of the released code on HF directory `hf_dir`, one line per problem."""
    from megatron_navil.conversion.errors import ConversionError
    from megatron_navil.conversion.hf_weights import open_hf_weights
    from megatron_navil.conversion.plan import check_source
    from megatron_navil.conversion.tokenizer_files import has_tokenizer, special_token_claims

    hf_dir = Path(hf_dir)
    d = _load_json(hf_dir / "config.json")
    if not isinstance(d, dict):
        return [
            f"config.json: missing or not JSON in {hf_dir}; export with navil-convert navil-to-hf"
        ]
    out = check_config(d)
    amap = d.get("auto_map") or {}
    for ref in amap.values():
        if "--" not in ref and not (hf_dir / f"{ref.split('.')[0]}.py").exists():
            out.append(
                f"auto_map: names local {ref.split('.')[0]}.py, which is not in {hf_dir}; "
                "copy the released code with --modeling-code DIR or use the hub reference"
            )
    if _load_json(hf_dir / "generation_config.json") is None:
        out.append("generation_config.json: missing; write it (navil-to-hf does)")
    if not has_tokenizer(hf_dir):
        out.append(
            f"tokenizer: no tokenizer files in {hf_dir} (AutoTokenizer finds nothing); "
            "export from a checkpoint that carries its tokenizer, or pass --tokenizer"
        )
    first = (d.get(EXTENSION) or {}).get("first_special_token_id")
    claims = special_token_claims(hf_dir)
    if first is None and claims.get(SPECIAL_TOKENS[0]):
        first = claims[SPECIAL_TOKENS[0]][0][0]
    if has_tokenizer(hf_dir):
        for row, token in enumerate(SPECIAL_TOKENS):
            want = None if first is None else first + row
            if not claims.get(token):
                out.append(
                    f"tokenizer: {token} is not registered (the released code looks it up "
                    f"by string); it must be id {want}"
                )
            out += [
                f"tokenizer: {name} gives {token} id {i}, the model's embedding row is {want} "
                f"(first_special_token_id + {row})"
                for i, name in claims.get(token, [])
                if want is not None and i != want
            ]
    try:
        cfg = from_hf_config(d, first)
        check_source(open_hf_weights(hf_dir, flag=None), cfg)  # a .bin is refused, named
    except ConversionError as e:
        out.append(f"weights: {e}")
    return out
