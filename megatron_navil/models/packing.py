"""Megatron's packed-sequence (THD) parameters for a list of segment lengths.

The vision encoder attends per image, its window plan per window, the decoder per sample: all
describe their segments the same way. The parameters also carry the boundaries as host ints
(`HostPackedSeqParams.host_cu_seqlens`), so nothing downstream has to read them back from the
device (the CPU attention stand-in loops over them; TE takes the tensor and max_seqlen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class HostPackedSeqParams(PackedSeqParams):
    """PackedSeqParams plus the segment boundaries as host ints."""

    host_cu_seqlens: Optional[tuple[int, ...]] = None
    """cu_seqlens_q (== cu_seqlens_kv) as host ints; None when unknown."""


def packed_params(seqlens: list[int], device) -> HostPackedSeqParams:
    """THD parameters of consecutive segments of `seqlens` tokens (cumulative int32 offsets),
    made from host ints: one copy of the offsets to `device` (pageable: the fallback when no
    precomputed offsets came with the batch)."""
    cu = torch.tensor([0] + seqlens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    host = [0]
    for s in seqlens:
        host.append(host[-1] + s)
    return thd_params(cu, tuple(host))


def thd_params(
    cu_seqlens: torch.Tensor, host_cu_seqlens: Sequence[int], max_seqlen: Optional[int] = None
) -> HostPackedSeqParams:
    """THD parameters from offsets already on the device and the same offsets as host ints (no
    copy, no device read); `max_seqlen` None: the longest segment of `host_cu_seqlens`."""
    host = tuple(host_cu_seqlens)
    longest = max_seqlen
    if longest is None:
        longest = max((b - a for a, b in zip(host[:-1], host[1:])), default=0)
    return HostPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        host_cu_seqlens=host,
    )


def append_segment(
    cu_seqlens: torch.Tensor, host_cu_seqlens: Sequence[int], length: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Offsets with one more segment of `length` tokens at the end, computed on the device
    (a padding segment the model adds for SP / FP8 row multiples)."""
    host = tuple(host_cu_seqlens)
    return torch.cat([cu_seqlens, cu_seqlens[-1:] + length]), host + (host[-1] + length,)
