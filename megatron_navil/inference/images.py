"""One image file -> the model's inputs, through the same resize/decode path as training.

Uses the loader's ImageSizer (NaViL's resize rules, optional multi-scale pyramid) and its DALI
decoder (CPU operators, or `mixed` on a GPU), so inference sees exactly the pixels training did.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.decode import DaliImageDecoder, DecodeFailure, ImageJob, normalize_pixels
from megatron_navil.data.layout import image_token_ids
from megatron_navil.data.sizing import ImageSizer


def prepare_image(
    path: str, cfg: NaViLModelConfig, multiscale: bool = False, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values [N, 3*P*P] float32, grid_thw [n_scales, 3], the image's token ids)."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(path) as img:
        width, height = ImageOps.exif_transpose(img).size  # the decoder applies EXIF too
    scales = ImageSizer(cfg, multiscale).scales(height, width)
    decoder = DaliImageDecoder(
        max_batch=1,
        num_scales=len(scales),
        num_threads=1,
        device=device,
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.connector.merge_size,
    )
    try:
        (result,) = decoder.decode([ImageJob(data, height, width, scales)])
    finally:
        decoder.close()
    if isinstance(result, DecodeFailure):
        raise ValueError(f"cannot use image {path}: {result.reason}")
    pixels = normalize_pixels(torch.cat(result))
    grids = [s.grid for s in scales]
    grid_thw = torch.tensor([(1, h, w) for h, w in grids], dtype=torch.long)
    return pixels, grid_thw, image_token_ids(cfg, grids)
