"""Image sizes and the image token layout of NaViL, as pure functions on sizes.

Resizing (released `Qwen2VLImageProcessor` with do_resize=False, do_pad=True):
  1. `smart_resize(h, w, min_pixels, max_pixels, factor=1)`: keep the aspect ratio and bring
     h*w into [min_pixels, max_pixels] with the Qwen2-VL rule, but with factor 1 (no rounding
     to multiples of 32: NaViL rounds to whole pixels),
  2. zero-pad bottom/right to multiples of patch_size * merge_size = 32 px (before the [-1, 1]
     normalisation, so padding enters the ViT as -1),
  3. grid = padded size / patch_size.
Multi-scale pyramid (released `anyres_preprocess_multi_scale`): the first scale uses
max_pixels = max_dynamic_patch * P^2; each next scale uses max_pixels = (pixels of the previous
*padded* grid) * ratio^2; stop when that budget falls below min_pixels or when the grid no
longer shrinks. Scales are ordered smallest first.
NOTE: in the release the budget of every scale after the first is a float32 torch scalar, so
the comparisons and `h*w / budget` run in float32 (torch computes `int / tensor` as
`reciprocal(tensor) * int`); `multiscale_plan` passes the same float32 tensor to reproduce the
released sizes bit for bit.

Token layout of one image: `<img>`, then per scale (smallest first) per merged row
`<IMG_CONTEXT>` x (w/2) `<IMG_LINE_BREAK>`, then `<IMG_FRAME_BREAK>` after the scale, then `</img>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Union

import torch

from megatron_navil.config.model import (
    IMG_CONTEXT,
    IMG_END,
    IMG_FRAME_BREAK,
    IMG_LINE_BREAK,
    IMG_START,
    NaViLModelConfig,
)

Number = Union[int, float, torch.Tensor]


@dataclass(frozen=True)
class ImageScale:
    """One scale of an image: sizes in pixels (height, width) and the patch grid."""

    resized: tuple[int, int]
    """Size after the aspect-preserving resize (what the resampler produces)."""
    padded: tuple[int, int]
    """Size after zero-padding bottom/right to multiples of patch_size * merge_size."""
    grid: tuple[int, int]
    """Patch grid (padded / patch_size): the (h, w) of this scale's grid_thw row (t = 1)."""


def smart_resize(
    height: int, width: int, min_pixels: Number, max_pixels: Number, factor: int = 1
) -> tuple[int, int]:
    """The Qwen2-VL resize rule: (h', w') multiples of `factor`, aspect kept, pixels in range.

    Rounds to the nearest multiple first; if that exceeds max_pixels, scales by
    beta = sqrt(h*w / max_pixels) and floors; if it is below min_pixels, scales up by
    sqrt(min_pixels / (h*w)) and ceils. NaViL calls it with factor = 1.
    """
    if height < factor or width < factor:
        raise ValueError(f"image {height}x{width} px is smaller than the resize factor {factor}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width} px: aspect ratio above 200 is not supported")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def resize_for_scale(
    height: int,
    width: int,
    min_pixels: Number,
    max_pixels: Number,
    patch_size: int = 16,
    merge_size: int = 2,
) -> ImageScale:
    """Resize (factor 1), pad to multiples of patch_size * merge_size, and grid one scale."""
    h, w = smart_resize(height, width, min_pixels, max_pixels, factor=1)
    unit = patch_size * merge_size
    ph, pw = math.ceil(h / unit) * unit, math.ceil(w / unit) * unit
    return ImageScale(resized=(h, w), padded=(ph, pw), grid=(ph // patch_size, pw // patch_size))


def multiscale_plan(height: int, width: int, cfg: NaViLModelConfig) -> list[ImageScale]:
    """All scales of an image, smallest first (the largest is the single-scale result)."""
    p, m = cfg.vision.patch_size, cfg.connector.merge_size
    min_pixels = cfg.min_dynamic_patch * p * p
    scales = [resize_for_scale(height, width, min_pixels, cfg.max_dynamic_patch * p * p, p, m)]
    while True:
        gh, gw = scales[0].grid
        # float32 budget, exactly as the release computes it from the int64 grid tensor
        budget = torch.tensor(gh * gw * p * p, dtype=torch.int64) * (cfg.scale_downsample_ratio**2)
        if budget < min_pixels:
            break
        nxt = resize_for_scale(height, width, min_pixels, budget, p, m)
        if nxt.grid[0] * nxt.grid[1] >= gh * gw:
            break
        scales.insert(0, nxt)
    return scales


def multiscale_grids(height: int, width: int, cfg: NaViLModelConfig) -> list[tuple[int, int]]:
    """Patch grids (h, w) of all scales, smallest first."""
    return [s.grid for s in multiscale_plan(height, width, cfg)]


def num_image_tokens(grids: Iterable[tuple[int, int]], merge_size: int = 2) -> int:
    """Number of <IMG_CONTEXT> tokens (merged visual tokens) of the given patch grids."""
    return sum((h // merge_size) * (w // merge_size) for h, w in grids)


def image_token_ids(cfg: NaViLModelConfig, grids: Iterable[tuple[int, int]]) -> list[int]:
    """Token ids of one image whose scales have patch grids `grids` (h, w), smallest first."""
    m = cfg.connector.merge_size
    ctx, line = cfg.special_token_id(IMG_CONTEXT), cfg.special_token_id(IMG_LINE_BREAK)
    ids = [cfg.special_token_id(IMG_START)]
    for h, w in grids:
        if h % m or w % m:
            raise ValueError(f"patch grid {(h, w)} is not a multiple of the merge size {m}")
        for _ in range(h // m):
            ids.extend([ctx] * (w // m))
            ids.append(line)
        ids.append(cfg.special_token_id(IMG_FRAME_BREAK))
    ids.append(cfg.special_token_id(IMG_END))
    return ids
