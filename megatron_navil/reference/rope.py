"""Rotary position embeddings: the 2D scheme of the vision encoder and the 1D scheme of the LLM.

Both use the `rotate_half` convention (HF/Megatron default, not interleaved): dimension d of a
head is paired with dimension d + head_dim/2 and the pair is rotated by angle[d].

Vision (Qwen2-VL scheme, as in the released NaViL encoder): with hd = head_dim, a patch at
(row r, col c) gets hd/4 frequencies f_k = theta^(-4k/hd), k = 0..hd/4-1, and the angle vector
over the first half of the head is `[r * f_0..f_{hd/4-1}, c * f_0..f_{hd/4-1}]`; the second half
repeats it (rotate_half pairs). So dims [0, hd/4) and [hd/2, 3hd/4) rotate with the row, dims
[hd/4, hd/2) and [3hd/4, hd) with the column.

LLM (HF Llama/InternLM2/Qwen3): angle[d] = pos * theta^(-2d/hd) for d < hd/2, repeated.
Angles are computed in float32 like the HF code, then cast to the activation dtype.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., hd] -> [..., hd]: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, hd] by `angles` [T, hd/2] (one angle per rotated pair).

    Computed in at least float32 (the released vision code upcasts to float32; float64 inputs
    stay float64 so parity tests can run in double), returned in x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    emb = torch.cat((angles, angles), dim=-1).to(device=x.device, dtype=dtype)[
        :, None, :
    ]  # [T, 1, hd]
    xf = x.to(dtype)
    out = xf * emb.cos() + rotate_half(xf) * emb.sin()
    return out.to(x.dtype)


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/dim) for i = 0..dim/2-1, float32 (the HF formula)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def vision_patch_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, [N_patches, 2], in the packed merge-block-major order.

    Patches of one image/scale with an h x w patch grid are ordered (h/m, w/m, m, m): all m x m
    patches of a merge block are consecutive, blocks are row-major.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        if t != 1:
            raise ValueError(f"grid_thw row {(t, h, w)}: only still images (t = 1) are supported")
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size)
        rows = rows.expand(h // merge_size, merge_size, w // merge_size, merge_size)
        cols = cols.expand(h // merge_size, merge_size, w // merge_size, merge_size)
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: merge-block-major
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack((rows, cols), dim=-1))
    return torch.cat(out, dim=0)


def vision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles [N, head_dim/2] for patches at `positions` [N, 2] = (row, col)."""
    inv_freq = _inv_freq(head_dim // 2, theta)  # [hd/4]
    row = positions[:, 0:1].float() * inv_freq  # [N, hd/4]
    col = positions[:, 1:2].float() * inv_freq  # [N, hd/4]
    return torch.cat((row, col), dim=-1)  # [N, hd/2]


def llm_rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles [T, head_dim/2] for 1D positions `position_ids` [T]."""
    inv_freq = _inv_freq(head_dim, theta).to(position_ids.device)
    return position_ids.float()[:, None] * inv_freq[None, :]
