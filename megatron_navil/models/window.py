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

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.models.packing import packed_params


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

    `enter` permutes a packed patch sequence (all images, plus the trailing padding segment)
    into window order and returns the window segments; `leave` undoes the permutation after the
    encoder unless the released window order is kept. Full-attention layers keep using the
    per-image segments (NaViLTransformerLayer picks one or the other).
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

    def plan(self, grid_thw: torch.Tensor, pad: int) -> tuple[torch.Tensor, list[int]]:
        """Patch permutation (including trailing padding rows) and window segment lengths."""
        unit = self.merge * self.merge
        perms, seqlens, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
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

    def enter(self, x: torch.Tensor, freqs: torch.Tensor, grid_thw: torch.Tensor, pad: int):
        """Permute patches (and RoPE angles) into window order; returns the window segments and
        the permutation, which the caller hands back to `leave`."""
        perm, seqlens = self.plan(grid_thw, pad)
        perm = perm.to(x.device)
        x, freqs = x.index_select(0, perm), freqs.index_select(0, perm)
        return x, freqs, packed_params(seqlens, x.device), perm

    def leave(self, h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Back to row order (out[perm[i]] = h[i]) unless the released window order is kept."""
        if self.keep_order:
            return h
        return torch.empty_like(h).index_copy(0, perm, h)
