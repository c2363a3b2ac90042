"""One training step on Megatron-Core's pipeline schedules.

`forward_step` is the `forward_step_func` of `get_forward_backward_func()`: it pulls the next
micro-batch (every pipeline stage reads the same stream, so every stage can build the modality
routing), runs this stage's model chunk, and on the last stage returns Megatron's per-token loss
triple (loss sum, token count, report). With `calculate_per_token_loss`, Megatron sums over
micro-batches and `finalize_model_grads` divides the gradients by the token count summed over
data-parallel ranks: the loss is the mean over every counted token of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig, pad_multiple_for
from megatron_navil.config.training import TrainingConfig, check_overlap_param_gather

# Trimmed micro-batches keep a multiple of this many tokens (TE/cuBLAS GEMM-friendly shapes).
TRIM_MULTIPLE = 16


def counted_positions(batch: NaViLBatch, img_context_id: int) -> torch.Tensor:
    """bool [T]: positions whose loss is counted (non-zero weight, input not <IMG_CONTEXT>)."""
    return (batch.loss_mask != 0) & (batch.tokens != img_context_id)


def loss_func(counted: torch.Tensor, per_position_loss: torch.Tensor):
    loss_sum = per_position_loss.sum()
    num_tokens = counted.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().float(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def padding_trim_multiple(
    training: TrainingConfig, parallel: ParallelConfig, precision: PrecisionConfig
) -> Optional[int]:
    """What `forward_step` trims each micro-batch's padding to (None = keep the full pack).

    Only with pipeline size 1: pipeline stages exchange activations of the fixed seq_length
    shape. The multiple honours 16, the FP8 row multiple and the TP size under SP."""
    if not training.trim_padding or parallel.pipeline_model_parallel_size > 1:
        return None
    m = pad_multiple_for(
        parallel.tensor_model_parallel_size, parallel.sequence_parallel, precision.row_multiple()
    )
    return m * TRIM_MULTIPLE // math.gcd(m, TRIM_MULTIPLE)


def forward_step(data_iterator: Iterator[NaViLBatch], model, trim_multiple: Optional[int] = None):
    """`trim_multiple`: cut the trailing padding to this multiple (padding_trim_multiple)."""
    batch: NaViLBatch = next(data_iterator)
    if trim_multiple is not None:
        batch = batch.trim_padding(trim_multiple)  # before the copy: fewer bytes to the device
    device = next(model.parameters()).device
    batch = batch.to(device)
    unwrapped = model.module if hasattr(model, "module") else model
    output = model(**batch.model_inputs())
    return output, partial(loss_func, counted_positions(batch, unwrapped.cfg.img_context_id))


def ddp_precision(precision: PrecisionConfig, backend: str) -> PrecisionConfig:
    """`precision` for a model that will train under Megatron DDP (navil-pretrain): the auto
    gradient-accumulation fusion (None) becomes on with the transformer_engine backend, whose
    wgrad GEMMs accumulate into the main_grad buffers DDP provides. Bare models keep it off
    (models/transformer_config.gradient_accumulation_fusion)."""
    if precision.gradient_accumulation_fusion is not None:
        return precision
    return dataclasses.replace(
        precision, gradient_accumulation_fusion=backend == "transformer_engine"
    )


def ddp_config(
    *,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    use_distributed_optimizer: bool = False,
    bucket_size: Optional[int] = None,
    grad_reduce_in_fp32: bool = True,
) -> DistributedDataParallelConfig:
    """Megatron DDP's config; refuses a parameter-gather overlap Megatron cannot do (without the
    distributed optimizer or the grad-reduce overlap) in one line naming the fix."""
    check_overlap_param_gather(overlap_param_gather, use_distributed_optimizer, overlap_grad_reduce)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )


def wrap_ddp(chunks: list, **ddp_kwargs) -> list[DistributedDataParallel]:
    """Wrap model chunks in Megatron DDP (contiguous grad buffers, bucketed reduction);
    `ddp_kwargs` are `ddp_config`'s."""
    ddp_cfg = ddp_config(**ddp_kwargs)
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_cfg,
                module=chunk,
                # Only the first chunk starts its grad reduce while later chunks still compute.
                disable_bucketing=i > 0,
            )
        )
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_cfg.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in wrapped]
        if len(wrapped) == 1:
            config.no_sync_func = config.no_sync_func[0]
        config.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    return wrapped


@contextlib.contextmanager
def params_gathered(chunks: list):
    """Parameters complete on every rank inside (for a checkpoint save or an evaluation).

    With overlap_param_gather the distributed optimizer's update is all-gathered only by the
    next forward's pre-hooks, so between a step and that forward a rank holds stale copies of
    the shards other ranks own. As Megatron-LM does around saves and evaluations: take the
    hooks off with a synchronous gather, and put them back after. A no-op without the overlap.
    """
    hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
    for c in hooked:
        c.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for c in hooked:
            c.enable_forward_pre_hook()


def forward_backward(
    chunks: list,
    batches: list[NaViLBatch],
    seq_length: int,
    forward_only: bool = False,
    trim_multiple: Optional[int] = None,
) -> list[dict]:
    """Run the pipeline schedule over `batches` (the micro-batches of one step on this DP rank).
    `trim_multiple`: see forward_step (None with PP > 1: `seq_length` is the p2p shape).

    Returns the per-micro-batch loss reports (non-empty on the last pipeline stage only).
    """
    for chunk in chunks:
        if hasattr(chunk, "zero_grad_buffer"):  # DDP-wrapped (training); bare in eval tools
            chunk.zero_grad_buffer()
    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, trim_multiple=trim_multiple),
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
