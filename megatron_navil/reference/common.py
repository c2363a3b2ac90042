"""Small building blocks shared by the vision encoder and the LLM of the reference model.

Attention here is deliberately the plain textbook computation on a dense [T, T] mask built from
segment ids: slow, but every confinement rule (per image, per window, per sample, causal) is one
readable boolean expression, which is what a reference is for.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in (at least) float32 as released."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] long: the index of the segment [cu[i], cu[i+1]) each position belongs to.

    Raises ValueError unless cu_seqlens starts at 0, never decreases and ends at `total`.
    """
    cu = cu_seqlens.to(torch.long).cpu()
    if cu.ndim != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != total or (cu[1:] < cu[:-1]).any():
        raise ValueError(
            f"cu_seqlens must be a 1-D, non-decreasing tensor from 0 to the sequence length "
            f"{total}; got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Masked softmax attention with GQA.

    q [T, H, hd], k/v [T, G, hd] with H % G == 0 (query head j reads kv head j // (H/G), the
    HF `repeat_kv` convention); position i attends to j iff segments[i] == segments[j] and, when
    `causal`, j <= i. Scale 1/sqrt(hd); softmax in (at least) float32. Returns [T, H, hd].
    """
    t, h, hd = q.shape
    g = k.shape[1]
    if h % g:
        raise ValueError(f"{h} query heads are not a multiple of {g} key/value heads")
    k = k.repeat_interleave(h // g, dim=1)  # [T, G, hd] -> [T, H, hd]
    v = v.repeat_interleave(h // g, dim=1)
    seg = segments.to(q.device)
    allowed = seg[:, None] == seg[None, :]  # [T, T]
    if causal:
        idx = torch.arange(t, device=q.device)
        allowed = allowed & (idx[None, :] <= idx[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # [H, T, T]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)  # [T, H, hd]


def route(
    x: torch.Tensor,
    visual: torch.Tensor,
    text_fn: Callable[[torch.Tensor], torch.Tensor],
    visual_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Apply `text_fn` to rows of x where `visual` is False and `visual_fn` where it is True.

    Each function only ever sees its own rows (as in the released code, which indexes with the
    mask), so a token's output cannot depend on the other modality's weights, and the unused
    expert gets an exactly-zero gradient. `visual_fn=None` means both modalities share text_fn.
    """
    if visual_fn is None:
        return text_fn(x)
    text_out = text_fn(x[~visual])
    vis_out = visual_fn(x[visual])
    out = text_out.new_empty(x.shape[:-1] + text_out.shape[-1:])
    out[~visual] = text_out
    out[visual] = vis_out
    return out
