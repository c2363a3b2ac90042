"""Exact token cost of every sample, from the index alone (no decoding, no tokenising).

The planner must count tokens exactly as the batch builder will produce them, or a pack
overflows. Both sides use the same two facts:
- an image of (height, width) px becomes the scales of `layout.resize_for_scale` (single scale)
  or `layout.multiscale_plan` (pyramid), and its tokens are `layout.image_token_ids` of their
  grids: `<img>` + per scale (h/2 rows of w/2 `<IMG_CONTEXT>` + `<IMG_LINE_BREAK>`, then
  `<IMG_FRAME_BREAK>`) + `</img>`;
- text tokens come from the index (`text_tokens`), plus BOS/EOS that the builder adds to
  caption/text/interleaved samples (conversations carry their own markers; see samples.py).
costs.py applies this to a window of samples at a time.
"""

from __future__ import annotations

import functools

from megatron_navil.config.model import NaViLModelConfig
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

    def vision(self, height: int, width: int) -> tuple[int, int, int]:
        """(visual tokens, patches, sum of patches^2 over scales) of one image: the tokens
        `NaViLModelConfig.visual_token_mask` sends to the visual experts (<img> and every
        <IMG_CONTEXT>), and the encoder's work (one grid_thw row per scale)."""
        m = self.merge
        grids = [s.grid for s in self.scales(height, width)]
        visual = 1 + sum((g[0] // m) * (g[1] // m) for g in grids)
        return visual, sum(g[0] * g[1] for g in grids), sum((g[0] * g[1]) ** 2 for g in grids)

    def tokens(self, height: int, width: int) -> int:
        """len(layout.image_token_ids(cfg, grids)) without building the list."""
        m = self.merge
        return 2 + sum(
            (g[0] // m) * (g[1] // m + 1) + 1 for g in (s.grid for s in self.scales(height, width))
        )
