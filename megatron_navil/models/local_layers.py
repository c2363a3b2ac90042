"""Pure-torch layers Megatron-Core does not provide (local backend; also used on GPU where noted).

- `ShardLinear`: a TP-sharded linear that does no communication. The modality experts split
  tokens by modality between two such linears and do the TP collective once for both.
- `TPRMSNorm`: RMSNorm over a hidden dim that is itself split over TP ranks (the vision
  encoder's full-width q/k norm: C is spread over the heads, the heads over TP ranks).
- `RMSNorm`: Megatron-constructor RMSNorm that, unlike Megatron's torch-norm wrapper, allows
  sequence parallelism (it only has to flag its weight for the TP gradient all-reduce).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_rank, get_pg_size


def mark_tp_sharded(param: torch.Tensor, partition_dim: int) -> None:
    """Flag `param` as one TP shard split along `partition_dim`, OVERWRITING earlier flags.

    Megatron's set_tensor_model_parallel_attributes asserts the flags are absent, but TE's
    Linear.reset_parameters has already set them (partition_dim 0 unless its own parallel_mode
    is "row", which ours is not), and a row-sharded shard needs partition_dim 1: the checkpoint
    and optimizer bookkeeping read these flags."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


def finish_shard_params(module: torch.nn.Module, partition_dim: int) -> None:
    """TP flags of a shard linear (local or TE): weight split along `partition_dim`, bias (if
    any, column-sharded only) along 0; every parameter is data-parallel all-reduced (not an
    expert parameter), as Megatron DDP reads `allreduce`."""
    mark_tp_sharded(module.weight, partition_dim)
    if getattr(module, "bias", None) is not None and module.bias.numel():
        mark_tp_sharded(module.bias, 0)
    for p in module.parameters():
        p.allreduce = True


class ShardLinear(torch.nn.Module):
    """y = x W^T (+ b), W split over TP along `partition_dim` (0: output rows, 1: input columns).

    Initialisation matches Megatron's Column/RowParallelLinear (the master weight is drawn whole
    and split), so a TP=2 model built with the same seed holds the shards of the TP=1 weights.
    `tp_group` None: one TP rank (the whole weight), as Megatron's get_pg_size(None) says.
    """

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
        super().__init__()
        if partition_dim == 1 and bias:
            raise ValueError(
                "a row-sharded ShardLinear cannot own a bias (it is added after the reduce)"
            )
        self.tp_group = tp_group
        self.partition_dim = partition_dim
        tp, rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        out_local = divide(output_size, tp) if partition_dim == 0 else output_size
        in_local = divide(input_size, tp) if partition_dim == 1 else input_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(out_local, in_local, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(
                    self.weight,
                    output_size,
                    input_size,
                    out_local if partition_dim == 0 else in_local,
                    partition_dim,
                    init_method,
                    params_dtype=config.params_dtype,
                    rank=rank,
                    world_size=tp,
                )
            else:
                _initialize_affine_weight_gpu(self.weight, init_method, partition_dim=partition_dim)
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(out_local, dtype=config.params_dtype, device=device)
            )
        else:
            self.register_parameter("bias", None)
        finish_shard_params(self, partition_dim)  # the init helpers set some flags already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axes = {"weight": self.partition_dim, "bias": 0}
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce in forward AND backward: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class TPRMSNorm(torch.nn.Module):
    """RMSNorm over the last dim where that dim is split over the TP ranks.

    The mean square is taken over the FULL width (sum of squares all-reduced over TP); each rank
    holds and scales by its own slice of the weight, so the weight is TP-sharded like the input.
    `tp_group` None: one TP rank.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.full_size = hidden_size
        local = divide(hidden_size, get_pg_size(self.tp_group))
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(local, dtype=config.params_dtype, device=device)
        )
        mark_tp_sharded(self.weight, 0)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sumsq = xf.pow(2).sum(-1, keepdim=True)
        if get_pg_size(self.tp_group) > 1:
            sumsq = _AllReduceSum.apply(sumsq, self.tp_group)
        y = xf * torch.rsqrt(sumsq / self.full_size + self.eps)
        return self.weight * y.to(x.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets
        )


class RMSNorm(torch.nn.Module):
    """x / rms(x) * weight, computed in float32 (as the HF InternLM2/Qwen3 norms do)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.eps = eps
        # Under SP each TP rank normalises only its chunk of the sequence: Megatron's
        # finalize_model_grads sums the weight gradient over TP for flagged parameters.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)
