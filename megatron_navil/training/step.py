"""One training step on Megatron-Core's pipeline schedules.

`forward_step` is the `forward_step_func` of `get_forward_backward_func()`: it pulls the next
micro-batch (every pipeline stage reads the same stream, so every stage can build the modality
routing), runs this stage's model chunk, and on the last stage returns Megatron's per-token loss
triple (loss sum, token count, report). With `calculate_per_token_loss`, Megatron sums over
micro-batches and `finalize_model_grads` divides the gradients by the token count summed over
data-parallel ranks: the loss is the mean over every counted token of the global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_navil.batch import NaViLBatch


def counted_positions(batch: NaViLBatch, img_context_id: int) -> torch.Tensor:
    """bool [T]: positions whose loss is counted (non-zero weight, input not <IMG_CONTEXT>)."""
    return (batch.loss_mask != 0) & (batch.tokens != img_context_id)


def loss_func(counted: torch.Tensor, per_position_loss: torch.Tensor):
    loss_sum = per_position_loss.sum()
    num_tokens = counted.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().float(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[NaViLBatch], model):
    batch: NaViLBatch = next(data_iterator)
    device = next(model.parameters()).device
    batch = batch.to(device)
    unwrapped = model.module if hasattr(model, "module") else model
    output = model(**batch.model_inputs())
    return output, partial(loss_func, counted_positions(batch, unwrapped.cfg.img_context_id))


def wrap_ddp(
    chunks: list,
    *,
    overlap_grad_reduce: bool = False,
    use_distributed_optimizer: bool = False,
    bucket_size: Optional[int] = None,
    grad_reduce_in_fp32: bool = True,
) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP (contiguous grad buffers, bucketed reduction)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk starts its grad reduce while later chunks still compute.
                disable_bucketing=i > 0,
            )
        )
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in wrapped]
        if len(wrapped) == 1:
            config.no_sync_func = config.no_sync_func[0]
        config.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    return wrapped


def forward_backward(
    chunks: list, batches: list[NaViLBatch], seq_length: int, forward_only: bool = False
) -> list[dict]:
    """Run the pipeline schedule over `batches` (the micro-batches of one step on this DP rank).

    Returns the per-micro-batch loss reports (non-empty on the last pipeline stage only).
    """
    for chunk in chunks:
        if hasattr(chunk, "zero_grad_buffer"):  # DDP-wrapped (training); bare in eval tools
            chunk.zero_grad_buffer()
    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
