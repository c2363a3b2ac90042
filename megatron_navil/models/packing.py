"""Megatron's packed-sequence (THD) parameters for a list of segment lengths.

The vision encoder attends per image, its window plan per window, the decoder per sample: all
describe their segments the same way.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def packed_params(seqlens: list[int], device) -> PackedSeqParams:
    """THD parameters of consecutive segments of `seqlens` tokens (cumulative int32 offsets)."""
    cu = torch.tensor([0] + seqlens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    longest = max(seqlens) if seqlens else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
