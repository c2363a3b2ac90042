"""Modality routing and the attention-side modality experts (MHA-MMoE).

Routing is a fixed mask, not a learned router: a token is *visual* iff its id is <IMG_CONTEXT>
or <img>. `ModalityRouting` is built once per micro-batch from that mask and passed explicitly
through model -> block -> layer -> attention/MLP (never stored on a module: a module global
would break under activation recompute and with several pipeline micro-batches in flight).

It precomputes a stable "grouped" order (text rows first, then visual rows, each group padded
with zero rows to a multiple of the FP8 recipe's row multiple under FP8) so every modality-split
GEMM is two dense GEMMs on contiguous row blocks, and the same index vectors serve all layers of
the micro-batch.

A modality absent from the pack still gets one block of zero rows (row_multiple rows, at least
one). So no kernel ever runs on zero rows (TE's GEMMs, norms and FP8 quantizers reject them),
every modality module runs on every micro-batch (FP8 amax bookkeeping and Megatron DDP's
grad-ready hooks then see the same modules whatever the pack), and the absent modality's
weights get a gradient that is exactly zero: their inputs are zero rows and their outputs are
dropped by `ungroup`, so both factors of the weight gradient vanish.

Under sequence parallelism the hidden states of a rank hold only its chunk of the sequence; the
modality linears see the gathered sequence (QKV gathers first, the output projection reduces
last), so they route with the full mask. The MoE dispatch path (EP > 1) routes the local chunk
with `local_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_navil.models.tp_regions import TPRegion

TEXT, VISUAL = 0, 1


def group_rows(count: int, row_multiple: int = 1) -> int:
    """Rows a modality group occupies: `count` rounded up to `row_multiple`, at least one block
    (an empty group would launch kernels on zero rows; see the module docstring)."""
    return max(1, -(-count // row_multiple)) * row_multiple


@dataclass
class ModalityRouting:
    """Per-micro-batch token -> modality routing over the packed sequence (flattened [s*b])."""

    mask: torch.Tensor
    """bool [N]: True where the token is visual (full sequence, N = s * b)."""
    dest: torch.Tensor
    """long [N]: row of each token in the grouped buffer."""
    order: Optional[torch.Tensor]
    """long [N]: tokens in grouped order (only when no padding rows are needed)."""
    counts: tuple[int, int]
    """(text, visual) token counts."""
    padded: tuple[int, int]
    """(text, visual) group sizes in the grouped buffer: counts rounded up to row_multiple, and
    never 0 (an absent modality gets row_multiple zero rows)."""
    local_mask: torch.Tensor
    """bool [N / sp]: this rank's sequence-parallel chunk of `mask` (== mask without SP)."""

    @classmethod
    def build(
        cls,
        mask: torch.Tensor,
        row_multiple: int = 1,
        sp_size: int = 1,
        sp_rank: int = 0,
        num_visual: Optional[int] = None,
    ) -> "ModalityRouting":
        """`num_visual`: the mask's popcount as a host int (pack_meta.py); None reads it from
        the mask (one host sync per micro-batch, shared by every layer). Everything else is
        elementwise on the mask's device."""
        mask = mask.reshape(-1).bool()
        n = mask.numel()
        n_vis = int(mask.sum()) if num_visual is None else num_visual
        n_txt = n - n_vis
        padded = (group_rows(n_txt, row_multiple), group_rows(n_vis, row_multiple))
        vis = mask.long()
        # Rank of each token within its own modality (stable: original order kept).
        rank_in_group = torch.where(mask, torch.cumsum(vis, 0) - 1, torch.cumsum(1 - vis, 0) - 1)
        dest = rank_in_group + vis * padded[TEXT]
        order = None
        if padded == (n_txt, n_vis):
            order = torch.empty_like(dest)
            order[dest] = torch.arange(n, device=mask.device)
        if n % sp_size:
            raise ValueError(
                f"sequence length {n} is not divisible by the sequence-parallel size {sp_size}"
            )
        chunk = n // sp_size
        local = mask[sp_rank * chunk : (sp_rank + 1) * chunk]
        return cls(mask, dest, order, (n_txt, n_vis), padded, local)

    @classmethod
    def from_tokens(
        cls, tokens: torch.Tensor, visual_ids: tuple[int, ...], **kw
    ) -> "ModalityRouting":
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for i in visual_ids:
            mask |= tokens == i
        return cls.build(mask, **kw)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [padded_text + padded_visual, ...]: text rows, then visual rows."""
        if self.order is not None:
            return x.index_select(0, self.order)
        out = x.new_zeros((sum(self.padded),) + tuple(x.shape[1:]))
        return out.index_copy(0, self.dest, x)

    def ungroup(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `group` (padding rows dropped)."""
        return y.index_select(0, self.dest)

    def apply(self, x: torch.Tensor, text_fn, visual_fn) -> torch.Tensor:
        """Run text_fn on text rows and visual_fn on visual rows of x [N, ...]; back in order."""
        grouped = self.group(x)
        n_txt = self.padded[TEXT]
        out = torch.cat([text_fn(grouped[:n_txt]), visual_fn(grouped[n_txt:])], dim=0)
        return self.ungroup(out)


class ModalityColumnParallelLinear(MegatronModule):
    """Column-parallel linear with a text and a visual weight (e.g. wqkv / wqkv_ve).

    [s_local, b, in] -> [s, b, out / tp]: gathers the sequence under SP (once, for both
    modalities), then each token uses its modality's local weight shard. `tp_group` None: one
    TP rank (whole weights).
    """

    accepts_routing = True  # the routed-slot protocol (models/routed.py)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool,
        shard_linear: type,
        tp_group=None,
        **unused,
    ):
        # `unused`: Megatron linear kwargs (gather_output, tp_comm_buffer_name, ...) the
        # attention passes to whichever linear the spec chose.
        super().__init__(config=config)
        self.tp_region = TPRegion.of(config, tp_group)
        kw = dict(
            config=config,
            init_method=init_method,
            bias=bias,
            partition_dim=0,
            tp_group=tp_group,
        )
        self.text = shard_linear(input_size, output_size, **kw)
        self.visual = shard_linear(input_size, output_size, **kw)

    def forward(self, x: torch.Tensor, routing: ModalityRouting):
        x = self.tp_region.enter_column(x)  # [s_local, b, in] -> [s, b, in]
        s, b, h = x.shape
        y = routing.apply(x.reshape(s * b, h), self.text, self.visual)
        return y.view(s, b, -1), None


class ModalityRowParallelLinear(MegatronModule):
    """Row-parallel linear with a text and a visual weight (e.g. wo / wo_ve), no bias.

    [s, b, in / tp] -> [s_local, b, out]. `composed=False`: visual tokens use the visual weight
    only (NaViL-9B). `composed=True`: visual tokens get visual(text(x)) (the released 2B code's
    wo_ve(wo(x))): every token goes through `text`, the reduced visual rows then through
    `visual` as a second row-parallel GEMM (one extra all-reduce over the visual rows).
    """

    accepts_routing = True  # the routed-slot protocol (models/routed.py)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool,
        shard_linear: type,
        composed: bool = False,
        tp_group=None,
        **unused,
    ):
        super().__init__(config=config)
        if bias:
            raise ValueError("modality output projections have no bias (InternLM2/Qwen3 have none)")
        self.tp_region = TPRegion.of(config, tp_group)
        self.composed = composed
        kw = dict(
            config=config,
            init_method=init_method,
            bias=False,
            partition_dim=1,
            tp_group=tp_group,
        )
        self.text = shard_linear(input_size, output_size, **kw)
        self.visual = shard_linear(output_size if composed else input_size, output_size, **kw)

    def forward(self, x: torch.Tensor, routing: ModalityRouting):
        s, b, h = x.shape
        flat = x.reshape(s * b, h)
        if not self.composed:
            partial = routing.apply(flat, self.text, self.visual).view(s, b, -1)  # [s, b, out]
            return self.tp_region.exit_row(partial), None  # complete [s_local, b, out]

        full = self.tp_region.all_reduce(self.text(flat))

        def visual(rows):
            # rows are complete (reduced) outputs of `text`; take this rank's input slice.
            return self.tp_region.all_reduce(self.visual(self.tp_region.split_last_dim(rows)))

        out = routing.apply(full, lambda rows: rows, visual).view(s, b, -1)
        return self.tp_region.scatter_sequence(out), None


class ModalityNorm(torch.nn.Module):
    """Two norms (text, visual) over the last dim of [s, b, heads, dim]; e.g. Qwen3's per-head
    q_norm / q_norm_ve. Each token is normalised with its modality's weight."""

    accepts_routing = True  # the routed-slot protocol (models/routed.py)

    def __init__(self, norm_cls: type, *, config, hidden_size: int, eps: float):
        super().__init__()
        self.text = norm_cls(config=config, hidden_size=hidden_size, eps=eps)
        self.visual = norm_cls(config=config, hidden_size=hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(routing.mask.numel(), -1, shape[-1])  # [N, heads, dim]
        return routing.apply(flat, self.text, self.visual).view(shape)
