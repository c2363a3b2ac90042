"""Exact token cost of every sample, from the index alone (no decoding, no tokenising).

The planner must count tokens exactly as the batch builder will produce them, or a pack
overflows. Both sides use the same two facts:
- an image of (height, width) px becomes the scales of `layout.resize_for_scale` (single scale)
  or `layout.multiscale_plan` (pyramid), and its tokens are `layout.image_token_ids` of their
  grids: `<img>` + per scale (h/2 rows of w/2 `<IMG_CONTEXT>` + `<IMG_LINE_BREAK>`, then
  `<IMG_FRAME_BREAK>`) + `</img>`;
- text tokens come from the index (`text_tokens`), plus BOS/EOS that the builder adds to
  caption/text/interleaved samples (conversations carry their own markers; see samples.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.index import KINDS, DatasetIndex
from megatron_navil.data.layout import ImageScale, multiscale_plan, resize_for_scale


class ImageSizer:
    """Scales (resize, pad, grid) and token count of an image, cached by its size."""

    def __init__(self, cfg: NaViLModelConfig, multiscale: bool):
        self.cfg, self.multiscale = cfg, multiscale
        self.patch, self.merge = cfg.vision.patch_size, cfg.connector.merge_size
        self.scales = functools.lru_cache(maxsize=65536)(self._scales)

    def _scales(self, height: int, width: int) -> tuple[ImageScale, ...]:
        if self.multiscale:
            return tuple(multiscale_plan(height, width, self.cfg))
        p = self.patch
        return (
            resize_for_scale(
                height,
                width,
                self.cfg.min_dynamic_patch * p * p,
                self.cfg.max_dynamic_patch * p * p,
                p,
                self.merge,
            ),
        )

    def tokens(self, height: int, width: int) -> int:
        """len(layout.image_token_ids(cfg, grids)) without building the list."""
        m = self.merge
        return 2 + sum(
            (g[0] // m) * (g[1] // m + 1) + 1 for g in (s.grid for s in self.scales(height, width))
        )


@dataclass
class SampleCosts:
    """Per-sample planning numbers of one dataset (arrays of length len(dataset))."""

    length: np.ndarray
    """int64: tokens of the whole sample as the builder lays it out."""
    num_images: np.ndarray
    """int64: images of the sample."""
    max_image_tokens: np.ndarray
    """int64: tokens of the sample's largest image (0 without images)."""
    max_scales: int
    """Most scales any image of the dataset has (sizes the decode pipeline)."""


def sample_costs(ds: DatasetIndex, sizer: ImageSizer, add_bos: bool) -> SampleCosts:
    """Planning numbers of every sample; a sample with an image the resize rule cannot size is
    refused in `ds` (`image_unsizable`) and its image costs 0 tokens."""
    n = len(ds)
    num_images = np.diff(ds.image_start)
    img_tokens = np.zeros(len(ds.image_height), dtype=np.int64)
    max_scales = 0
    owner = np.repeat(np.arange(n), num_images)
    if len(img_tokens):
        # Many images share a size: size each distinct (h, w) once.
        sizes = np.stack([ds.image_height, ds.image_width], axis=1)
        uniq, inverse = np.unique(sizes, axis=0, return_inverse=True)
        per, why = np.zeros(len(uniq), dtype=np.int64), {}
        for u, (h, w) in enumerate(uniq.tolist()):
            try:
                per[u] = sizer.tokens(h, w)
                max_scales = max(max_scales, len(sizer.scales(h, w)))
            except ValueError as e:  # NaViL's resize rule cannot size it (aspect ratio > 200)
                why[u] = str(e)
        img_tokens = per[inverse.reshape(-1)]
        for r in np.nonzero(np.isin(inverse.reshape(-1), list(why)))[0]:
            ds.refuse(int(owner[r]), "image_unsizable", why[int(inverse.reshape(-1)[r])])
    image_sum = np.bincount(owner, weights=img_tokens, minlength=n).astype(np.int64)
    max_img = np.zeros(n, dtype=np.int64)
    np.maximum.at(max_img, owner, img_tokens)
    plain = ds.kind != KINDS.index("conversation")
    extra = plain.astype(np.int64) * (1 + int(add_bos))  # EOS (+ BOS) on non-chat samples
    return SampleCosts(
        length=ds.text_tokens + image_sum + extra,
        num_images=num_images,
        max_image_tokens=max_img,
        max_scales=max_scales,
    )
