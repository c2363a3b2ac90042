"""Rotary position frequencies, one row per token, in Megatron's [s, 1, 1, dim] layout.

Megatron's `apply_rotary_pos_emb` (non-interleaved, rotate_half convention) rotates the first
`dim` channels of each head with cos/sin of these angles. Per-token rows let one code path
serve the LLM (1D positions restarting per packed sample) and the vision encoder (2D).
"""

from __future__ import annotations

import torch


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2 (float32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rope_1d(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """position_ids [s] -> angles [s, 1, 1, head_dim] = cat(f, f) with f = pos * inv_freq."""
    f = position_ids.to(torch.float32)[:, None] * inverse_frequencies(
        head_dim, theta, position_ids.device
    )
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def patch_positions(grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """(row, col) of every patch, images/scales concatenated, merge-block-major order.

    grid_thw [n, 3] (t, h, w in patches) -> [sum(t*h*w), 2]. Within an image the patches are
    ordered (h/merge, w/merge, merge, merge): each merge x merge block is contiguous.
    """
    rows = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        pos = torch.stack([hpos, wpos], dim=-1)  # [h, w, 2]
        # [h, w, 2] -> [h/m, m, w/m, m, 2] -> [h/m, w/m, m, m, 2]
        pos = pos.reshape(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4)
        rows.append(pos.reshape(-1, 2).repeat(t, 1))
    return torch.cat(rows, dim=0)


def rope_2d(grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int = 2) -> torch.Tensor:
    """Vision RoPE (Qwen2-VL scheme): half the rotary pairs encode the row, half the column.

    angles = cat(row * inv, col * inv) with inv over head_dim / 2 channels, duplicated as
    cat(a, a) for the rotate_half convention -> [n_patches, 1, 1, head_dim].
    """
    pos = patch_positions(grid_thw, merge).to(torch.float32)  # [n, 2]
    inv = inverse_frequencies(head_dim // 2, theta)  # [head_dim / 4]
    a = torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], dim=-1)  # [n, head_dim / 2]
    return torch.cat([a, a], dim=-1)[:, None, None, :]
