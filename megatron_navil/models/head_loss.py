"""LM head + vocab-parallel cross entropy in row chunks, never holding the whole logits tensor.

The plain path (language.py) makes the logits of every loss row ([n, V/tp] in the activation
dtype), copies them to fp32, and Megatron's cross entropy keeps an fp32 softmax of the same size
for backward: at n = 8192 rows and a 92k vocabulary that is 1.5 GB of bf16 plus two 3 GB fp32
tensors per micro-batch, and as many passes over them. Here, per chunk of `chunk` rows, forward
makes the chunk's logits, reduces them to each row's loss and log-sum-exp over the TP group (the
max, the target logit and the sum of exponentials: three all-reduces of [chunk] each, as
Megatron's cross entropy does for the whole set), and drops them; backward recomputes the chunk's
logits from the saved input rows and weight, forms softmax - one_hot scaled by the incoming
gradient, and runs the two GEMMs of the head's backward on it. Peak extra memory is one chunk's
fp32 logits; the price is the head's forward GEMM run twice (about 1/3 more head FLOPs).

The numbers are the plain path's: the same GEMM in the same dtype, the same fp32 softmax
(max-shifted), padded vocabulary columns at -inf; the weight gradient accumulates over chunks in
fp32. tests/models/test_head_loss.py compares losses and gradients with the plain path (one
process and TP = 2 with and without SP).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_navil.models.tp_regions import TPRegion, all_reduce_

__all__ = ["chunked_head_cross_entropy"]


def chunked_head_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    region: TPRegion,
    vocab_size: int,
    chunk: int,
) -> torch.Tensor:
    """Per-row cross entropy [n] (fp32) of the LM head `weight` [V_padded / tp, D] on rows
    `x` [n, D] (already entered into the TP region: replicated on every TP rank, its gradient
    reduced by the caller's region crossing) against global token ids `target` [n]. Columns at
    or past `vocab_size` (vocabulary padding) get zero probability."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedHeadCE.apply(x, weight, target, region, vocab_size, chunk)


def _vocab_slice(weight: torch.Tensor, region: TPRegion) -> tuple[int, int]:
    """[start, end) of the global vocabulary this rank's weight rows hold."""
    return VocabUtility.vocab_range_from_per_partition_vocab_size(
        weight.shape[0], region.rank, region.size
    )


def _chunk_logits(
    x: torch.Tensor, weight: torch.Tensor, start: int, vocab_size: int
) -> torch.Tensor:
    """fp32 logits [c, V / tp] of one chunk, vocabulary padding at -inf (as language._logits)."""
    logits = torch.matmul(x, weight.t()).float()
    if start + weight.shape[0] > vocab_size:
        cols = torch.arange(weight.shape[0], device=logits.device) + start
        logits.masked_fill_(cols >= vocab_size, float("-inf"))
    return logits


def _target_columns(
    target: torch.Tensor, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each row's target, clamped to 0 where another rank holds it; whether
    this rank holds it), with masked_fill rather than boolean indexing (no host sync)."""
    outside = (target < start) | (target >= end)
    return (target - start).masked_fill(outside, 0), ~outside


class _ChunkedHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, region: TPRegion, vocab_size: int, chunk: int):
        start, end = _vocab_slice(weight, region)
        n = x.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            logits = _chunk_logits(x[a:b], weight, start, vocab_size)
            row_max = logits.max(dim=-1).values
            all_reduce_(row_max, region, torch.distributed.ReduceOp.MAX)
            logits -= row_max[:, None]
            col, mine = _target_columns(target[a:b], start, end)
            picked = logits.gather(1, col[:, None])[:, 0].masked_fill(~mine, 0.0)
            sum_exp = logits.exp_().sum(dim=-1)
            all_reduce_(picked, region)
            all_reduce_(sum_exp, region)
            log_sum = sum_exp.log()
            loss[a:b] = log_sum - picked
            lse[a:b] = row_max + log_sum
        ctx.save_for_backward(x, weight, target, lse)
        ctx.region, ctx.vocab_size, ctx.chunk = region, vocab_size, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, weight, target, lse = ctx.saved_tensors
        region, chunk = ctx.region, ctx.chunk
        start, end = _vocab_slice(weight, region)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w: Optional[torch.Tensor] = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 for bf16 weights
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for a in range(0, x.shape[0], chunk):
            b = min(a + chunk, x.shape[0])
            logits = _chunk_logits(x[a:b], weight, start, ctx.vocab_size)
            probs = logits.sub_(lse[a:b, None]).exp_()  # the softmax, from the saved lse
            col, mine = _target_columns(target[a:b], start, end)
            probs.scatter_add_(1, col[:, None], -mine.to(probs.dtype)[:, None])
            g = (probs * grad_loss[a:b, None]).to(x.dtype)  # d loss / d logits
            if grad_x is not None:
                grad_x[a:b] = torch.matmul(g, weight)
            if grad_w is not None:
                grad_w += torch.matmul(g.t(), x[a:b]).to(grad_w.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None
