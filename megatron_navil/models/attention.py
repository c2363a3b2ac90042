"""Self-attention for both the vision encoder and the LLM, assembled from spec submodules.

    hidden [s_local, b, h]
      -> linear_qkv            plain column-parallel, or per-modality (MHA-MMoE)     [s, b, ng*(np/ng+2)*hn / tp]
      -> split q, k, v         Megatron's grouped layout: per KV group [q_1..q_g, k, v]
      -> q/k norm (optional)   per head (LLM, per modality) or over the full width (ViT, TPRMSNorm)
      -> RoPE                  per-token frequencies: 1D positions (LLM) or (row, col) (ViT)
      -> core attention        packed THD segments: causal (LLM samples) / bidirectional (images)
      -> linear_proj           plain row-parallel, or per-modality (separate or composed)
    -> [s_local, b, h]

Why not Megatron's SelfAttention: the modality projections take the routing as an argument,
the ViT's q/k norm spans all heads, and RoPE frequencies here are per token (2D for images,
restarting per packed sample for the LLM) rather than a prefix of one table.

linear_qkv, linear_proj and the q/k norms are routed slots: always called with `routing=`,
which plain modules ignore (models/routed.py), so this module never asks what a spec gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide, get_pg_size

from megatron_navil.models.local_layers import TPRMSNorm
from megatron_navil.models.modality import ModalityRouting
from megatron_navil.models.routed import accept_routing, build_routed


@dataclass
class NaViLAttentionSubmodules:
    """Spec slots of NaViLSelfAttention."""

    linear_qkv: Union[ModuleSpec, type]
    core_attention: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]
    q_layernorm: Optional[Union[ModuleSpec, type]] = None
    k_layernorm: Optional[Union[ModuleSpec, type]] = None


class NaViLSelfAttention(MegatronModule):
    """Packed (THD) self-attention of both the vision encoder and the LLM (flow in the module
    docstring), assembled from the spec slots of NaViLAttentionSubmodules.

    The LLM uses causal attention over packed samples with 1D RoPE and, with attention experts,
    per-modality QKV / output projections and per-head q/k norms; the encoder uses
    bidirectional attention within each image with 2D RoPE, biased QKV and optional full-width
    q/k norms (`full_width_qk_norm`: TPRMSNorm over all heads, named q_norm/k_norm). Heads and
    KV groups are split over the TP group of `pg_collection` (required).
    """

    def __init__(
        self,
        config,
        submodules: NaViLAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        qkv_bias: bool = False,
        full_width_qk_norm: bool = False,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("NaViLSelfAttention needs the model's pg_collection")
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp  # read by Megatron's RoPE helper (no CP here: size 1)
        tp = get_pg_size(self.tp_group)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.hn = config.kv_channels
        if config.num_query_groups % tp:
            raise ValueError(
                f"{config.num_query_groups} KV groups cannot be split over TP={tp}; choose a TP "
                "size that divides the number of KV heads"
            )
        self.np = divide(config.num_attention_heads, tp)  # query heads on this rank
        self.ng = divide(config.num_query_groups, tp)  # KV groups on this rank
        q_size = config.num_attention_heads * self.hn
        qkv_size = q_size + 2 * config.num_query_groups * self.hn

        self.linear_qkv = build_routed(
            submodules.linear_qkv,
            config.hidden_size,
            qkv_size,
            config=config,
            init_method=config.init_method,
            bias=qkv_bias,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        self.full_width_qk_norm = full_width_qk_norm
        norm_size = q_size if full_width_qk_norm else self.hn
        q_norm = self._build_norm(submodules.q_layernorm, config, norm_size)
        k_norm = self._build_norm(submodules.k_layernorm, config, norm_size)
        # NOTE: Megatron's finalize_model_grads sums over TP the gradient of every parameter
        # named like `q_layernorm` / `k_layernorm` when the LLM has qk_layernorm (right for the
        # per-head norms, replicated over TP). The encoder's full-width norms are TP-SHARDED,
        # so they must not carry that name: they are `q_norm` / `k_norm` (as in the HF layout).
        if full_width_qk_norm:
            self.q_norm, self.k_norm = q_norm, k_norm
            self.q_layernorm = self.k_layernorm = None
        else:
            self.q_layernorm, self.k_layernorm = q_norm, k_norm
            self.q_norm = self.k_norm = None
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            pg_collection=pg_collection,
        )
        self.linear_proj = build_routed(
            submodules.linear_proj,
            q_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )
        self.recompute_core_attention = (
            config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules
        )

    def _build_norm(self, spec, config, size):
        if spec is None:
            return None
        if isinstance(spec, type) and issubclass(spec, TPRMSNorm):
            # the only norm whose width is split over TP: it needs the group
            return accept_routing(
                spec(config, size, config.layernorm_epsilon, tp_group=self.tp_group)
            )
        return build_routed(spec, config=config, hidden_size=size, eps=config.layernorm_epsilon)

    def _norm(self, norm, x: torch.Tensor, routing: Optional[ModalityRouting]) -> torch.Tensor:
        if norm is None:
            return x
        if self.full_width_qk_norm:
            s, b = x.shape[:2]
            # [s, b, heads, hn] -> [s, b, heads * hn]: over all (local) heads at once
            return norm(x.reshape(s, b, -1), routing=routing).view_as(x)
        return norm(x, routing=routing)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rotary_freqs: torch.Tensor,
        packed_seq_params: PackedSeqParams,
        routing: Optional[ModalityRouting] = None,
    ):
        mixed, _ = self.linear_qkv(hidden_states, routing=routing)
        s, b = mixed.shape[:2]
        per_group = self.np // self.ng
        # [s, b, ng * (np/ng + 2) * hn] -> [s, b, ng, (np/ng + 2) * hn]
        mixed = mixed.view(s, b, self.ng, (per_group + 2) * self.hn)
        q, k, v = torch.split(mixed, [per_group * self.hn, self.hn, self.hn], dim=3)
        q = q.reshape(s, b, self.np, self.hn)  # [s, b, np, hn]
        wide = self.full_width_qk_norm
        q = self._norm(self.q_norm if wide else self.q_layernorm, q, routing)
        k = self._norm(self.k_norm if wide else self.k_layernorm, k, routing)  # [s, b, ng, hn]

        q = apply_rotary_pos_emb(q, rotary_freqs, config=self.config, cp_group=self.cp_group)
        k = apply_rotary_pos_emb(k, rotary_freqs, config=self.config, cp_group=self.cp_group)

        # THD: the packed sequence is the token dim, b == 1.  [s, 1, heads, hn] -> [s, heads, hn]
        q, k, v = (x.reshape(s * b, x.shape[2], self.hn) for x in (q, k, v))

        def attend(q, k, v):
            return self.core_attention(q, k, v, packed_seq_params=packed_seq_params)

        if self.recompute_core_attention and self.training:
            context = tensor_parallel.checkpoint(attend, False, q, k, v)
        else:
            context = attend(q, k, v)
        context = context.view(s, b, -1)  # [s, b, np * hn]

        return self.linear_proj(context, routing=routing)
