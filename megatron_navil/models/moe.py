"""FFN-MMoE: the text and visual SwiGLU FFNs as the two experts of Megatron's MoE layer.

Expert 0 is the text FFN, expert 1 the visual FFN. Routing is the fixed modality mask, so the
router has no parameters: probs are exactly 1 for the token's expert, top-1, no aux loss, no
capacity. Two execution paths over the SAME expert modules (so checkpoints are interchangeable):

- EP = 1 (fast path, no dispatcher): gather the sequence over TP (SP), reorder rows text-first
  with the precomputed routing (one index_select), run the experts module on the two contiguous
  row blocks (a grouped GEMM with TE), restore the order, then one TP reduce(-scatter).
- EP = 2: Megatron's token dispatcher (alltoall/allgather) moves visual tokens to the rank
  holding the visual expert and back; we only supply the routing.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import get_pg_size

from megatron_navil.models.modality import ModalityRouting


class ModalityRouter(MegatronModule):
    """Parameter-free router: each token goes to its modality's expert with probability 1.

    Fits MoESubmodules.router (built as router(config=..., pg_collection=...)); unlike
    Megatron's TopKRouter it allocates no gate weight.
    """

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config)
        if config.num_moe_experts != 2:
            raise ValueError(f"modality routing needs exactly 2 experts, got {config.num_moe_experts}")
        self.layer_number = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, visual_mask: torch.Tensor):
        """visual_mask [tokens] -> probs [tokens, 2] (float32), routing_map [tokens, 2] (bool)."""
        routing_map = torch.stack([~visual_mask, visual_mask], dim=1)
        return routing_map.to(torch.float32), routing_map


class ModalityMoELayer(MoELayer):
    """Megatron MoELayer whose routing comes from the modality mask (see module docstring)."""

    def forward(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        if self.ep_group.size() == 1:
            return self._fast_path(hidden_states, routing)
        return self._dispatch_path(hidden_states, routing)

    def _fast_path(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        tp = get_pg_size(self.tp_group)
        sp = self.config.sequence_parallel and tp > 1
        # The experts' linears do no TP communication (Megatron treats them as "explicit expert
        # comm"); we do it once here, as a dispatcher would.
        if sp:
            x = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
        elif tp > 1:
            x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        else:
            x = hidden_states
        s, b, h = x.shape
        grouped = routing.group(x.reshape(s * b, h))  # [n_text, h] ++ [n_visual, h]
        tokens_per_expert = torch.tensor(routing.padded, dtype=torch.long)
        probs = grouped.new_ones(grouped.shape[0], dtype=torch.float32)
        out, bias = self.experts(grouped, tokens_per_expert, probs)
        if bias is not None:
            raise ValueError("modality experts have no bias")
        y = routing.ungroup(out).view(s, b, h)  # partial sums over TP
        if sp:
            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
        elif tp > 1:
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y, None

    def _dispatch_path(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        probs, routing_map = self.router(hidden_states, routing.local_mask)
        hidden, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(dispatched, probs)
        output = self.combine(output)
        return self.postprocess(output, None), None


__all__ = ["ModalityRouter", "ModalityMoELayer"]
