"""Transformer Engine counterparts of local_layers / core_attention (GPU backend only).

- `TEShardLinear`: a TE Linear holding one TP shard and doing no communication (TE's own
  parallel modes are off), so the modality experts keep owning their collectives, exactly like
  the local `ShardLinear`; FP8-capable. Under FP8 the modality routing pads every group's rows
  to the recipe's multiple (16; 32 for MXFP8) before these GEMMs, and never hands them 0 rows.
- `TEVarlenAttention`: Megatron's TEDotProductAttention (cuDNN/flash fused attention) called in
  THD form with our packed-sequence params; causal/no_mask become padding_causal/padding there.

Importing this module needs Transformer Engine; backends.get_backend imports it only for the TE
backend.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import transformer_engine as te
from megatron.core.extensions.transformer_engine import (
    TEDotProductAttention,
    _get_extra_te_kwargs,
    condition_init_method,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_size

from megatron_navil.models.local_layers import finish_shard_params


class TEShardLinear(te.pytorch.Linear):
    """One TP shard of a linear as a TE Linear, with no communication of its own (the TE
    counterpart of local_layers.ShardLinear, same constructor and checkpoint layout).

    `partition_dim` 0 splits the output rows (column-parallel), 1 the input columns
    (row-parallel, no bias); `tp_group` only sizes the shard (None: one TP rank). TE's own
    tensor/sequence parallelism is off: the modality experts own their collectives
    (models/tp_regions.py). Zero-row inputs are refused (see forward)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method: Callable,
        bias: bool,
        partition_dim: int,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        tp = get_pg_size(tp_group)  # None: one TP rank, like the local ShardLinear
        out_local = divide(output_size, tp) if partition_dim == 0 else output_size
        in_local = divide(input_size, tp) if partition_dim == 1 else input_size
        if partition_dim == 1 and bias:
            raise ValueError("a row-sharded TEShardLinear cannot own a bias")
        tracker = get_cuda_rng_tracker()
        super().__init__(
            in_features=in_local,
            out_features=out_local,
            sequence_parallel=False,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion,
            tp_group=None,
            tp_size=1,
            get_rng_state_tracker=get_cuda_rng_tracker if tracker.is_initialized() else None,
            init_method=condition_init_method(config, init_method),
            bias=bias,
            return_bias=False,
            parallel_mode=None,
            **_get_extra_te_kwargs(config),
        )
        self.partition_dim = partition_dim
        # TE's reset_parameters flagged the weight as split along dim 0: overwrite (row shards
        # are split along 1), as Megatron's own helper would refuse to.
        finish_shard_params(self, partition_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            # ModalityRouting gives every group >= 1 row block; a zero-row input is a bug
            # upstream, and TE's GEMMs and FP8 quantizers would fail on it less clearly.
            raise ValueError("TEShardLinear got 0 rows; route through ModalityRouting.group")
        return super().forward(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axes = {"weight": self.partition_dim, "bias": 0}
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets)


class TEVarlenAttention(TEDotProductAttention):
    """Megatron's TEDotProductAttention called on packed (THD) sequences: the local
    VarlenDotProductAttention's interface (q [t, heads, hn], k/v [t, groups, hn],
    packed_seq_params; returns [t, heads * hn]) on TE's fused kernels. The mask type given at
    construction (causal for the LLM, no_mask for the vision encoder) is passed on every call;
    Megatron maps it to the padding variant for THD."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str = "self",
        pg_collection=None,
        **unused,
    ):
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            pg_collection=pg_collection,
        )
        self.navil_mask_type = attn_mask_type

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        packed_seq_params: PackedSeqParams,
    ) -> torch.Tensor:
        out = super().forward(
            query,
            key,
            value,
            None,
            attn_mask_type=self.navil_mask_type,
            packed_seq_params=packed_seq_params,
        )
        return out.reshape(query.shape[0], -1)  # [t, heads * hn]
