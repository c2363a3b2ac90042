"""Optional window attention in the vision encoder (Qwen2.5-VL style).

Layers outside `fullatt_block_indexes` attend within square windows of
`window_size / (merge * patch)` merged tokens per side. As in the released code, each image's
patches are permuted into window order once, before the first layer (whole 2x2 merge blocks
move together, so pixel shuffle is unaffected), and the 2D RoPE angles move with them; full
attention layers are permutation-invariant within an image. The released NaViL code never
restores row order, so merged tokens reach the LLM in window order: `keep_window_order`
reproduces that; otherwise `leave` restores row order after the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_navil.config.model import NaViLModelConfig


def window_order(h_m: int, w_m: int, ws: int) -> tuple[torch.Tensor, list[int]]:
    """Merged-token indices of an h_m x w_m grid in window order, and the window sizes.

    Windows tile the grid from the top-left; edge windows are smaller (the grid is padded to a
    multiple of ws and the padding dropped), row-major inside each window and across windows.
    """
    ph, pw = -h_m % ws, -w_m % ws
    index = torch.arange(h_m * w_m).reshape(h_m, w_m)
    index = torch.nn.functional.pad(index, (0, pw, 0, ph), value=-1)
    nh, nw = (h_m + ph) // ws, (w_m + pw) // ws
    # [nh*ws, nw*ws] -> [nh, ws, nw, ws] -> [nh, nw, ws, ws] -> [windows, ws*ws]
    windows = index.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, ws * ws)
    sizes = (windows >= 0).sum(dim=1).tolist()
    flat = windows.reshape(-1)
    return flat[flat >= 0], [s for s in sizes if s > 0]


@dataclass
class WindowPlan:
    """Window attention of the vision encoder for one model config: which patch order and which
    attention segments the windowed layers use.

    `plan` gives the window-order permutation of a packed patch sequence (all images, plus the
    trailing padding segment) and the window segments; `enter` applies it; `leave` undoes the
    permutation after the encoder unless the released window order is kept. Full-attention
    layers keep using the per-image segments (NaViLTransformerLayer picks one or the other).
    """

    window_merged: int
    """Window side in merged tokens."""
    merge: int
    """Merge block side (patches)."""
    keep_order: bool
    """Leave the encoder output in window order (the released quirk)."""

    @classmethod
    def from_config(cls, cfg: NaViLModelConfig) -> "WindowPlan":
        m = cfg.connector.merge_size
        return cls(
            cfg.vision.window_size // (m * cfg.vision.patch_size), m, cfg.vision.keep_window_order
        )

    def plan(self, grids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, list[int]]:
        """Patch permutation (including trailing padding rows) and window segment lengths, on
        the CPU from host grids (t, h, w): the loader precomputes it (pack_meta.py), the model
        only when it gets no metadata."""
        unit = self.merge * self.merge
        perms, seqlens, offset = [], [], 0
        for t, h, w in grids:
            for _ in range(t):
                order, sizes = window_order(h // self.merge, w // self.merge, self.window_merged)
                # merged-token order -> patch order: each merged token owns `unit` patches
                patch = (order[:, None] * unit + torch.arange(unit)).reshape(-1)
                perms.append(patch + offset)
                seqlens += [s * unit for s in sizes]
                offset += h * w
        if pad:
            perms.append(torch.arange(offset, offset + pad))
            seqlens.append(pad)
        return torch.cat(perms), seqlens

    @staticmethod
    def enter(x: torch.Tensor, freqs: torch.Tensor, perm: torch.Tensor):
        """Permute patches (and RoPE angles) into window order with `perm` (on x's device; the
        caller keeps it for `leave`)."""
        return x.index_select(0, perm), freqs.index_select(0, perm)

    def leave(self, h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Back to row order (out[perm[i]] = h[i]) unless the released window order is kept."""
        if self.keep_order:
            return h
        return torch.empty_like(h).index_copy(0, perm, h)
