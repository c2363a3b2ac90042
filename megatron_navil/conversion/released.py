"""What the released NaViL modelling code needs from an HF directory (the facts; release.py
checks a directory against them, hf_config.py writes config.json by them).

Facts about the release (OpenGVLab/NaViL-2B and -9B on the Hugging Face hub, transformers 4.51;
read for understanding, none of its code is shipped here):
- the repositories and `llm_config.architectures` of each LLM family are in
  megatron_navil/backbones (`released_repo`, `released_architecture`).
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

import math

from megatron_navil.backbones import Backbone
from megatron_navil.config.model import NaViLModelConfig

AUTO_MAP = {
    "AutoConfig": "configuration_navil_chat.NaViLChatConfig",
    "AutoModel": "modeling_navil_chat.NaViL",
    "AutoModelForCausalLM": "modeling_navil_chat.NaViL",
}
"""The released config.json's auto_map (module.Class, relative to the code's repository)."""
CODE_FILES = ("configuration_navil_chat.py", "modeling_navil_chat.py")
"""Files a local copy of the released code (`--modeling-code`) must have at least."""
RELEASED_TEMPLATES = (
    "internvl_zh",
    "Hermes-2",
    "Hermes-2-imgen",
    "internlm2-chat",
    "internlm2-chat-imgen",
    "phi3-chat",
    "qwen3-chat",
)
"""Conversation templates the released conversation.py registers."""
MAX_ASPECT_RATIO = 200
GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.51.0"}
"""generation_config.json as the release writes it (generation settings come from the chat code)."""
REQUIRED_TOP = (
    "architectures",
    "model_type",
    "vision_config",
    "llm_config",
    "template",
    "downsample_ratio",
    "select_layer",
    "ps_version",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "scale_downsample_ratio",
    "force_image_size",
    "auto_map",
)
REQUIRED_VISION = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "qkv_bias",
    "qk_normalization",
    "norm_type",
    "layer_norm_eps",
    "initializer_factor",
    "window_size",
    "image_size",
)
REQUIRED_LLM = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "rope_theta",
    "vocab_size",
    "max_position_embeddings",
)


def auto_map(family: Backbone, local: bool = False) -> dict[str, str]:
    """config.json `auto_map`: the family's hub code (its `released_repo`), or (`local`) files
    beside config.json."""
    if local:
        return dict(AUTO_MAP)
    return {k: f"{family.released_repo}--{v}" for k, v in AUTO_MAP.items()}


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
