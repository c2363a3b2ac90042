"""Every tensor-parallel (TP) and sequence-parallel (SP) boundary of the model, in one helper.

A module that does its own TP communication (the modality linears, the FFN experts' fast path,
the embedding/LM head, the vision encoder) holds a `TPRegion` built from its TP group and the
config, and crosses boundaries only through it:

    replicated / SP chunk  --enter_column-->  full sequence, every TP rank (column-parallel input)
                                              | column-parallel GEMMs ... row-parallel GEMMs
    replicated / SP chunk  <--exit_row------  partial sums over TP (row-parallel output)

| method            | no SP (or TP = 1)               | SP (TP > 1)                          |
|-------------------|---------------------------------|--------------------------------------|
| `enter_column`    | copy (backward: all-reduce)     | all-gather the sequence              |
| `exit_row`        | all-reduce                      | reduce-scatter the sequence          |
| `scatter_sequence`| identity                        | keep this rank's sequence chunk      |
| `gather_sequence` | identity                        | all-gather the sequence              |

plus the pieces of the released 2B "composed" projection (`all_reduce`, `split_last_dim`), the
vocab-parallel logits (`gather_last_dim`) and the vocab-parallel cross entropy.

Why one helper: the `sequence_parallel and tp > 1` decision and the choice of collective were
repeated in five modules, and two of them read Megatron's global TP group. The group comes from
the model's ProcessGroupCollection (models/navil.py); a `TPRegion` never reads parallel_state.
With one TP rank (or no group) every method is the identity and issues no collective: Megatron's
mapping functions would otherwise fall back to the global TP group when given none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.utils import get_pg_rank, get_pg_size


@dataclass(frozen=True)
class TPRegion:
    """The TP/SP boundary crossings of one module (see the module docstring)."""

    group: Optional[torch.distributed.ProcessGroup]
    """The tensor-parallel group (None: one TP rank)."""
    sequence_parallel: bool
    """Activations outside the region are split along the sequence over the TP ranks."""

    @classmethod
    def of(cls, config, group: Optional[torch.distributed.ProcessGroup]) -> "TPRegion":
        """The region of a module with TransformerConfig `config` on TP group `group`: sequence
        parallel only when the config asks for it AND there is more than one TP rank."""
        return cls(group, bool(config.sequence_parallel) and get_pg_size(group) > 1)

    @property
    def size(self) -> int:
        return get_pg_size(self.group)

    @property
    def rank(self) -> int:
        return get_pg_rank(self.group)

    @property
    def sequence_chunk(self) -> tuple[int, int]:
        """(number of sequence chunks, this rank's chunk): (1, 0) without SP."""
        return (self.size, self.rank) if self.sequence_parallel else (1, 0)

    # ------------------------------------------------------------------ GEMM boundaries
    def enter_column(self, x: torch.Tensor) -> torch.Tensor:
        """[s_local, b, h] -> [s, b, h] on every TP rank: the input of column-parallel GEMMs."""
        if self.size == 1:
            return x
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, group=self.group)
        return mappings.copy_to_tensor_model_parallel_region(x, group=self.group)

    def exit_row(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums [s, b, h] of row-parallel GEMMs -> complete [s_local, b, h]."""
        if self.size == 1:
            return y
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(y, group=self.group)
        return mappings.reduce_from_tensor_model_parallel_region(y, group=self.group)

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums -> complete values on every rank, whatever SP says (the composed
        projection's inner GEMM)."""
        if self.size == 1:
            return y
        return mappings.reduce_from_tensor_model_parallel_region(y, group=self.group)

    def split_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated [..., h] -> this rank's [..., h / tp] (backward: all-gather)."""
        if self.size == 1:
            return x
        return mappings.scatter_to_tensor_model_parallel_region(x, group=self.group)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's [..., v / tp] -> [..., v] on every rank (vocab-parallel logits)."""
        if self.size == 1:
            return x
        return mappings.gather_from_tensor_model_parallel_region(x, group=self.group)

    # ------------------------------------------------------------------ sequence boundaries
    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated [s, b, h] -> this rank's SP chunk [s / tp, b, h] (identity without SP)."""
        if not self.sequence_parallel:
            return x
        return mappings.scatter_to_sequence_parallel_region(x, group=self.group)

    def gather_sequence(self, x: torch.Tensor, grad_is_partial: bool = True) -> torch.Tensor:
        """SP chunks [s / tp, b, h] -> [s, b, h] on every rank (identity without SP).

        `grad_is_partial`: the gradient arriving from downstream holds per-rank partial sums
        (TP-parallel consumers: backward reduce-scatters); False when everything downstream is
        replicated over TP, so the gradients are identical and backward just splits."""
        if not self.sequence_parallel:
            return x
        return mappings.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=grad_is_partial, group=self.group
        )

    # ------------------------------------------------------------------ loss
    def cross_entropy(self, vocab_parallel_logits: torch.Tensor, target: torch.Tensor):
        """Megatron's vocab-parallel cross entropy over THIS region's group.

        Megatron-Core 0.16.1's `vocab_parallel_cross_entropy` always reads the global TP group;
        this is the same computation (its own VocabParallelCrossEntropy steps, no label
        smoothing) with the group passed explicitly."""
        return _VocabParallelCE.apply(vocab_parallel_logits, target, self)


class _VocabParallelCE(torch.autograd.Function):
    """Megatron's _VocabParallelCrossEntropy (label smoothing 0) with an explicit group."""

    @staticmethod
    def forward(ctx, logits, target, region: TPRegion):
        steps = VocabParallelCrossEntropy
        logits, logits_max = steps.calculate_logits_max(logits)
        all_reduce_(logits_max, region, torch.distributed.ReduceOp.MAX)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), region.rank, region.size
        )
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = _predicted_logits(
            logits, target, logits_max, start, end
        )
        all_reduce_(predicted, region)
        all_reduce_(sum_exp, region)
        exp_logits, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        steps = VocabParallelCrossEntropy
        grad_2d, arange_1d, update, grad_input = steps.prepare_gradient_calculation_operands(
            softmax, target_mask
        )
        grad = steps.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_output
        )
        return grad, None, None


def _predicted_logits(logits, target, logits_max, start: int, end: int):
    """Megatron's `VocabParallelCrossEntropy.calculate_predicted_logits`, the same values, with
    `masked_fill_` where it assigns through a boolean mask: `x[mask] = 0` is an index_put with a
    boolean index, which runs a nonzero first (a host sync per micro-batch on a GPU, twice).
    tests/models/test_tp_regions.py compares the two bit for bit."""
    logits -= logits_max.unsqueeze(dim=-1)  # in place, as Megatron: saves memory
    target_mask = (target < start) | (target >= end)  # targets outside this rank's vocab slice
    masked_target = (target.clone() - start).masked_fill_(target_mask, 0)
    logits_2d = logits.view(-1, logits.size(-1))  # [n, V / tp]
    masked_target_1d = masked_target.view(-1)
    rows = torch.arange(logits_2d.size(0), device=logits_2d.device)
    predicted = logits_2d[rows, masked_target_1d].clone().contiguous().view_as(target)
    predicted.masked_fill_(target_mask, 0.0)
    exp_logits = torch.exp(logits, out=logits)
    return target_mask, masked_target_1d, predicted, exp_logits.sum(dim=-1), exp_logits


def all_reduce_(t: torch.Tensor, region: TPRegion, op=torch.distributed.ReduceOp.SUM) -> None:
    """In-place all-reduce over the region's group (nothing with one TP rank)."""
    if region.size > 1:
        torch.distributed.all_reduce(t, op=op, group=region.group)
