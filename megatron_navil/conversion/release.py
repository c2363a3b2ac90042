"""What the released NaViL modelling code needs from an HF directory, and the check of it.

Facts about the release (OpenGVLab/NaViL-2B and -9B on the Hugging Face hub, transformers 4.51;
read for understanding, none of its code is shipped here):
- config.json's `auto_map` names `configuration_navil_chat.NaViLChatConfig` and
  `modeling_navil_chat.NaViL`; the hub code is per backbone (the 9B files import only the Qwen3
  LLM, the 2B files InternLM2), so an export points at the repository of its own family, in
  transformers' cross-repository form `owner/repo--module.Class`.
- the vision encoder ALWAYS permutes merged tokens into window order (`get_window_index`,
  window side = `vision_config.window_size // merge` merged tokens, asserted > 0) and never
  restores row order; the permutation is the identity exactly when an image's merged grid fits
  in one window column (merged width <= window side). A model trained in raster order is
  therefore exported with a window wider than any admissible image (`raster_window_patches`);
  one trained with `keep_window_order` keeps its own window.
- admissible images: aspect ratio <= 200 (the processor raises above), pixels brought into
  [min_dynamic_patch, max_dynamic_patch] x patch^2 keeping the aspect ratio, then zero-padded to
  multiples of patch x merge; multi-scale adds only smaller scales.
- the vision q/k norm is applied to a tensor already viewed back to [.., heads, head_dim] while
  its weight has the full width: it only works with one attention head.
- `template` is looked up in the release's conversation templates (a KeyError otherwise), and
  the 12 special tokens by string through the tokenizer (`convert_tokens_to_ids`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig

RELEASED_REPOS = {"internlm2": "OpenGVLab/NaViL-2B", "qwen3": "OpenGVLab/NaViL-9B"}
"""Hub repositories whose remote code loads an export of each LLM family."""
AUTO_MAP = {"AutoConfig": "configuration_navil_chat.NaViLChatConfig",
            "AutoModel": "modeling_navil_chat.NaViL",
            "AutoModelForCausalLM": "modeling_navil_chat.NaViL"}
"""The released config.json's auto_map (module.Class, relative to the code's repository)."""
CODE_FILES = ("configuration_navil_chat.py", "modeling_navil_chat.py")
"""Files a local copy of the released code (`--modeling-code`) must have at least."""
RELEASED_TEMPLATES = ("internvl_zh", "Hermes-2", "Hermes-2-imgen", "internlm2-chat",
                      "internlm2-chat-imgen", "phi3-chat", "qwen3-chat")
"""Conversation templates the released conversation.py registers."""
LLM_ARCHITECTURES = {"internlm2": "InternLM2VEForCausalLM", "qwen3": "Qwen3VEForCausalLM"}
MAX_ASPECT_RATIO = 200
GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.51.0"}
"""generation_config.json as the release writes it (generation settings come from the chat code)."""
REQUIRED_TOP = ("architectures", "model_type", "vision_config", "llm_config", "template",
                "downsample_ratio", "select_layer", "ps_version", "min_dynamic_patch",
                "max_dynamic_patch", "scale_downsample_ratio", "force_image_size", "auto_map")
REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "patch_size", "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps",
                   "initializer_factor", "window_size", "image_size")
REQUIRED_LLM = ("architectures", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "num_hidden_layers", "rms_norm_eps", "rope_theta",
                "vocab_size", "max_position_embeddings")


def auto_map(backbone: str, local: bool = False) -> dict[str, str]:
    """config.json `auto_map`: the family's hub code, or (`local`) files beside config.json."""
    if local:
        return dict(AUTO_MAP)
    repo = RELEASED_REPOS[backbone]
    return {k: f"{repo}--{v}" for k, v in AUTO_MAP.items()}


def widest_merged_tokens(cfg: NaViLModelConfig) -> int:
    """Largest merged-token width (= height, by symmetry) of any scale of any admissible image.

    The resize keeps w/h <= 200 and brings h*w to at most max_pixels (or scales a small image up
    to min_pixels < max_pixels), so the resized width is at most sqrt(200 * max_pixels); padding
    rounds it up to whole merge blocks. Smaller scales are narrower."""
    p, m = cfg.vision.patch_size, cfg.connector.merge_size
    max_pixels = cfg.max_dynamic_patch * p * p
    widest_px = math.isqrt(MAX_ASPECT_RATIO * max_pixels)  # floor of the bound
    return -(-widest_px // (p * m))


def raster_window_patches(cfg: NaViLModelConfig) -> int:
    """The released `window_size` (patches) under which its window order is the identity for
    every admissible image: one window column as wide as the widest merged grid."""
    return cfg.connector.merge_size * widest_merged_tokens(cfg)


# ----------------------------------------------------------------------------- the check


def _load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_config(d: dict) -> list[str]:
    """Problems the released code would hit with this config.json dict (one line each:
    `field: what is wrong; the fix`). Empty when it loads."""
    from megatron_navil.conversion.hf_config import EXTENSION

    out = []
    for key in REQUIRED_TOP:
        if d.get(key) is None:
            out.append(f"{key}: missing; the released NaViLChatConfig reads it (re-export with "
                       "navil-convert navil-to-hf)")
    if d.get("model_type") not in (None, "navil_chat"):
        out.append(f"model_type: {d['model_type']!r}; the released code registers 'navil_chat'")
    if d.get("architectures") not in (None, ["NaViL"]):
        out.append(f"architectures: {d['architectures']!r}; the release uses [\"NaViL\"]")
    vision, llm = d.get("vision_config") or {}, d.get("llm_config") or {}
    out += [f"vision_config.{k}: missing; the released vision config defaults it to another "
            "model's value, write it explicitly" for k in REQUIRED_VISION if vision.get(k) is None]
    out += [f"llm_config.{k}: missing; the released LLM config defaults it to another model's "
            "value, write it explicitly" for k in REQUIRED_LLM if llm.get(k) is None]
    arch = (llm.get("architectures") or [None])[0]
    backbone = next((b for b, a in LLM_ARCHITECTURES.items() if a == arch), None)
    if llm and backbone is None:
        out.append(f"llm_config.architectures: {arch!r}; the released code accepts "
                   f"{' or '.join(LLM_ARCHITECTURES.values())}")
    if d.get("template") is not None and d["template"] not in RELEASED_TEMPLATES:
        out.append(f"template: {d['template']!r} is not a released conversation template; use one "
                   f"of {', '.join(RELEASED_TEMPLATES)} (internlm2-chat / qwen3-chat)")
    if vision.get("qk_normalization") and (vision.get("num_attention_heads") or 1) > 1:
        out.append("vision_config.qk_normalization: true with "
                   f"{vision['num_attention_heads']} heads; the released encoder applies the "
                   "full-width q/k norm to per-head tensors and fails unless there is 1 head: "
                   "such a model cannot run in the released code")
    out += _window_problems(d, vision)
    amap = d.get("auto_map") or {}
    for key, target in AUTO_MAP.items():
        ref = amap.get(key)
        if amap and ref is None:
            out.append(f"auto_map.{key}: missing; it must name {target}")
        elif ref is not None and ref.split("--")[-1] != target:
            out.append(f"auto_map.{key}: {ref!r} does not name the released {target}")
        elif ref is not None and "--" in ref and backbone is not None \
                and ref.split("--")[0] != RELEASED_REPOS[backbone]:
            out.append(f"auto_map.{key}: {ref.split('--')[0]} does not hold the {backbone} code; "
                       f"use {RELEASED_REPOS[backbone]}")
    ext = d.get(EXTENSION) or {}
    if ext.get("attention_experts") is False or ext.get("ffn_experts") is False:
        out.append(f"{EXTENSION}.attention_experts/ffn_experts: the released code always has "
                   "modality experts in attention and FFN; a model without them cannot be released "
                   "in this format")
    return out


def _window_problems(d: dict, vision: dict) -> list[str]:
    from megatron_navil.conversion.hf_config import EXTENSION

    window = vision.get("window_size")
    merge = round(1.0 / d.get("downsample_ratio", 0.5))
    if window is None:
        return []
    if window // merge <= 0:
        return [f"vision_config.window_size: {window} patches; the released encoder asserts "
                f"window_size // {merge} > 0 on every image (re-export: raster-order models get a "
                "window wider than any image)"]
    ext = d.get(EXTENSION) or {}
    if ext.get("keep_window_order", True):
        return []  # trained in the released window order: its own window is right
    if (ext.get("window_size") or 0) > 0:
        return ["megatron_navil.keep_window_order: false with window attention; the released "
                "encoder keeps merged tokens in window order, so the LLM would see another order "
                "than in training: train with vision.keep_window_order=true to release"]
    from megatron_navil.conversion.hf_config import from_hf_config

    try:
        cfg = from_hf_config(d)
    except Exception:  # the field problems are reported above
        return []
    need = raster_window_patches(cfg)
    if window < need:
        return [f"vision_config.window_size: {window} patches; the model was trained in row order "
                f"and the widest admissible image is {widest_merged_tokens(cfg)} merged tokens "
                f"wide, so the released window order is the identity only from {need} patches: "
                f"set it to {need} (navil-convert navil-to-hf does)"]
    return []


def check_release(hf_dir: Path) -> list[str]:
    """Every constraint of the released code on HF directory `hf_dir`, one line per problem."""
    from megatron_navil.conversion.errors import ConversionError
    from megatron_navil.conversion.hf_config import EXTENSION, from_hf_config
    from megatron_navil.conversion.plan import check_source
    from megatron_navil.conversion.safetensors_io import SafetensorsDir
    from megatron_navil.conversion.tokenizer_files import has_tokenizer, special_token_claims

    hf_dir = Path(hf_dir)
    d = _load_json(hf_dir / "config.json")
    if not isinstance(d, dict):
        return [f"config.json: missing or not JSON in {hf_dir}; export with navil-convert navil-to-hf"]
    out = check_config(d)
    amap = d.get("auto_map") or {}
    for ref in amap.values():
        if "--" not in ref and not (hf_dir / f"{ref.split('.')[0]}.py").exists():
            out.append(f"auto_map: names local {ref.split('.')[0]}.py, which is not in {hf_dir}; "
                       "copy the released code with --modeling-code DIR or use the hub reference")
    if _load_json(hf_dir / "generation_config.json") is None:
        out.append("generation_config.json: missing; write it (navil-to-hf does)")
    if not has_tokenizer(hf_dir):
        out.append(f"tokenizer: no tokenizer files in {hf_dir} (AutoTokenizer finds nothing); "
                   "export from a checkpoint that carries its tokenizer, or pass --tokenizer")
    first = (d.get(EXTENSION) or {}).get("first_special_token_id")
    claims = special_token_claims(hf_dir)
    if first is None and claims.get(SPECIAL_TOKENS[0]):
        first = claims[SPECIAL_TOKENS[0]][0][0]
    if has_tokenizer(hf_dir):
        for row, token in enumerate(SPECIAL_TOKENS):
            want = None if first is None else first + row
            if not claims.get(token):
                out.append(f"tokenizer: {token} is not registered (the released code looks it up "
                           f"by string); it must be id {want}")
            out += [f"tokenizer: {name} gives {token} id {i}, the model's embedding row is {want} "
                    f"(first_special_token_id + {row})"
                    for i, name in claims.get(token, []) if want is not None and i != want]
    try:
        cfg = from_hf_config(d, first)
        check_source(SafetensorsDir(hf_dir), cfg)
    except ConversionError as e:
        out.append(f"weights: {e}")
    return out
