"""FFN-MMoE: the text and visual SwiGLU FFNs as the two experts of Megatron's MoE layer.

Expert 0 is the text FFN, expert 1 the visual FFN. Routing is the fixed modality mask, so the
router has no parameters: probs are exactly 1 for the token's expert, top-1, no aux loss, no
capacity. Two execution paths over the SAME expert modules (so checkpoints are interchangeable):

- EP = 1 (fast path, no dispatcher): gather the sequence over TP (SP), reorder rows text-first
  with the precomputed routing (one index_select), run the experts module on the two contiguous
  row blocks (a grouped GEMM with TE), restore the order, then one TP reduce(-scatter).
- EP = 2: Megatron's token dispatcher (alltoall/allgather) moves visual tokens to the rank
  holding the visual expert and back; we only supply the routing. A local expert that received
  no token at all (no rank of the EP group had that modality) runs on a block of zero rows that
  is dropped afterwards, as the EP = 1 path's routing does: no kernel on zero rows, and the
  expert's weight gradient is exactly zero rather than absent.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_navil.models.modality import ModalityRouting, group_rows
from megatron_navil.models.tp_regions import TPRegion


class ModalityRouter(MegatronModule):
    """Parameter-free router: each token goes to its modality's expert with probability 1.

    Fits MoESubmodules.router (built as router(config=..., pg_collection=...)); unlike
    Megatron's TopKRouter it allocates no gate weight.
    """

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config)
        if config.num_moe_experts != 2:
            raise ValueError(
                f"modality routing needs exactly 2 experts, got {config.num_moe_experts}"
            )
        self.layer_number = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, visual_mask: torch.Tensor):
        """visual_mask [tokens] -> probs [tokens, 2] (float32), routing_map [tokens, 2] (bool)."""
        routing_map = torch.stack([~visual_mask, visual_mask], dim=1)
        return routing_map.to(torch.float32), routing_map


def run_experts_nonempty(
    experts,
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    probs: torch.Tensor,
    row_multiple: int = 1,
):
    """experts(x, tokens_per_expert, probs) with every expert given at least one block of rows:
    an expert with 0 tokens gets `row_multiple` zero rows (prob 0), removed from the output."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    if all(counts):
        return experts(x, tokens_per_expert, probs)
    xs, ps = torch.split(x, counts), torch.split(probs, counts)
    new_x, new_p, rows = [], [], []
    for c, xi, pi in zip(counts, xs, ps):
        n = c if c else group_rows(0, row_multiple)
        new_x.append(xi if c else x.new_zeros(n, x.shape[-1]))
        new_p.append(pi if c else probs.new_zeros((n,) + tuple(probs.shape[1:])))
        rows.append(n)
    out, bias = experts(torch.cat(new_x), torch.tensor(rows, dtype=torch.long), torch.cat(new_p))
    kept = [o for o, c in zip(torch.split(out, rows), counts) if c]
    return (torch.cat(kept) if kept else out[:0]), bias


class ModalityMoELayer(MoELayer):
    """Megatron MoELayer whose routing comes from the modality mask (see module docstring).

    `row_multiple`: the FP8 recipe's row multiple (1 without FP8), for the zero-row blocks.
    `pg_collection` is required: Megatron's MoELayer would otherwise read its global groups."""

    accepts_routing = True  # the routed-slot protocol (models/routed.py)

    def __init__(self, config, submodules, *, pg_collection, layer_number=None, row_multiple=1):
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.row_multiple = row_multiple
        self.tp_region = TPRegion.of(config, self.tp_group)

    def forward(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        if self.ep_group.size() == 1:
            return self._fast_path(hidden_states, routing)
        return self._dispatch_path(hidden_states, routing)

    def _fast_path(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        # The experts' linears do no TP communication (Megatron treats them as "explicit expert
        # comm"); we do it once here, as a dispatcher would.
        x = self.tp_region.enter_column(hidden_states)  # [s_local, b, h] -> [s, b, h]
        s, b, h = x.shape
        grouped = routing.group(x.reshape(s * b, h))  # [n_text, h] ++ [n_visual, h]
        tokens_per_expert = torch.tensor(routing.padded, dtype=torch.long)
        # Probs of 1 in the activation dtype: the experts scale their SwiGLU output by them, and
        # fp32 probs would promote that product to an fp32 copy of the whole [rows, ffn]
        # intermediate (fused or not). x * 1 is exact in any dtype, so the output is bitwise
        # the same. (The EP > 1 path keeps the router's fp32 probs: Megatron's dispatchers run
        # their TP reduce-scatter in the probs' dtype, a precision choice.)
        probs = grouped.new_ones(grouped.shape[0])
        out, bias = self.experts(grouped, tokens_per_expert, probs)
        if bias is not None:
            raise ValueError("modality experts have no bias")
        y = routing.ungroup(out).view(s, b, h)  # partial sums over TP
        return self.tp_region.exit_row(y), None  # -> [s_local, b, h]

    def _dispatch_path(self, hidden_states: torch.Tensor, routing: ModalityRouting):
        probs, routing_map = self.router(hidden_states, routing.local_mask)
        hidden, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(dispatched, probs)
        output = self.combine(output)
        return self.postprocess(output, None), None

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Megatron's, with experts that received no token run on a zero block (see above)."""
        x, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(
            hidden_states, probs
        )
        out, bias = run_experts_nonempty(
            self.experts, x, tokens_per_expert, permuted_probs, self.row_multiple
        )
        if bias is not None:
            raise ValueError("modality experts have no bias")
        return self.token_dispatcher.combine_preprocess(out), None


__all__ = ["ModalityRouter", "ModalityMoELayer", "run_experts_nonempty"]
