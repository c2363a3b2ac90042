"""Plain-PyTorch reference implementation of NaViL in the Hugging Face checkpoint layout.

Small and slow on purpose: every rule (routing, masks, RoPE layout, token layout) is written out
so the Megatron-Core model and the HF conversion tools can be tested against it. It imports
nothing from Megatron-Core. Entry points:

- `NaViLReference(cfg)`: the model; `state_dict()` keys are the released HF names.
- `next_token_loss`, `loss_sums`: the text loss and its exact normalisation.
- `layout`: image resize rule, multi-scale pyramid, image token layout.
"""

from megatron_navil.data.layout import (
    ImageScale,
    image_token_ids,
    multiscale_grids,
    multiscale_plan,
    num_image_tokens,
    resize_for_scale,
    smart_resize,
)
from megatron_navil.reference.llm import pack_internlm2_wqkv, unpack_internlm2_wqkv
from megatron_navil.reference.loss import IGNORE_INDEX, loss_sums, next_token_loss
from megatron_navil.reference.model import NaViLReference, pixel_shuffle
from megatron_navil.reference.vision import window_order

__all__ = [
    "NaViLReference",
    "pixel_shuffle",
    "next_token_loss",
    "loss_sums",
    "IGNORE_INDEX",
    "pack_internlm2_wqkv",
    "unpack_internlm2_wqkv",
    "window_order",
    "ImageScale",
    "image_token_ids",
    "multiscale_grids",
    "multiscale_plan",
    "num_image_tokens",
    "resize_for_scale",
    "smart_resize",
]
