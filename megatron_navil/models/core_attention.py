"""Packed-sequence (THD) core attention in pure torch: the local backend's fused-attention stand-in.

Megatron-Core's local DotProductAttention rejects packed sequences, so CPU runs use this:
segments given by cu_seqlens attend only within themselves, causally (LLM samples) or
bidirectionally (images in the vision encoder). One SDPA call per segment keeps the cost
proportional to sum(len_i^2) rather than total_len^2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class VarlenDotProductAttention(MegatronModule):
    """softmax(q k^T / sqrt(d)) v within each packed segment; GQA by repeating k/v heads.

    Inputs follow Megatron's THD convention: q [t, heads, d], k/v [t, groups, d]; returns
    [t, heads * d].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        softmax_scale: Optional[float] = None,
        **unused,
    ):
        super().__init__(config=config)
        self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        self.dropout_p = config.attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        packed_seq_params: PackedSeqParams,
    ) -> torch.Tensor:
        t, heads, d = query.shape
        groups = key.shape[1]
        if heads != groups:
            # [t, g, d] -> [t, heads, d]: query heads h*(heads/g)..(h+1)*(heads/g)-1 share group h.
            key = key.repeat_interleave(heads // groups, dim=1)
            value = value.repeat_interleave(heads // groups, dim=1)
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(d)
        dropout = self.dropout_p if self.training else 0.0
        # host boundaries when the caller has them (models/packing.py): no device read
        cu = getattr(packed_seq_params, "host_cu_seqlens", None)
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != t:
            raise ValueError(f"cu_seqlens {cu[0]}..{cu[-1]} do not cover the {t} packed tokens")
        outs = []
        for start, end in zip(cu[:-1], cu[1:]):
            if end == start:
                continue
            # [len, heads, d] -> [heads, len, d]
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=self.causal, scale=scale
            )
            outs.append(o.transpose(0, 1))
        return torch.cat(outs, dim=0).reshape(t, heads * d)
