"""Megatron optimizer (AdamW, optionally distributed) and its LR/WD scheduler.

Three workarounds for Megatron-Core 0.16.1 with torch's Adam share ONE condition,
`uses_torch_adam`: Megatron falls back to torch's Adam(W) when neither Transformer Engine nor
apex imports. That is always the case on CPU (utils/cpu_compat.needed()), but also on a GPU
without them (the local backend's warned fallback), where the same bugs would bite; so the
condition is the optimizer's type, not the device."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_navil.config.parallel import PrecisionConfig
from megatron_navil.config.training import OptimizerSettings, StageConfig, TrainingConfig
from megatron_navil.training.stages import lr_overrides
from megatron_navil.utils.dtypes import torch_dtype


def build_optimizer(
    chunks: list, opt: OptimizerSettings, stage: StageConfig, precision: PrecisionConfig
):
    dtype = torch_dtype(precision.params_dtype)
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        overlap_param_gather=opt.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, chunks, config_overrides=lr_overrides(stage, opt))
    _patch_torch_adam_step_restore(optimizer)
    return optimizer


def uses_torch_adam(sub) -> bool:
    """Whether Megatron optimizer `sub` steps with torch's Adam(W): the one condition of the
    torch-Adam workarounds (see the module docstring)."""
    return isinstance(getattr(sub, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))


def _patch_torch_adam_step_restore(optimizer) -> None:
    """Work around a Megatron-Core 0.16.1 bug hit only with torch's Adam (`uses_torch_adam`).

    Loading a distributed-optimizer checkpoint first puts the common `step` into every torch
    Adam state, then copies the per-parameter tensors WITHOUT `step` into every state key ->
    KeyError('step'). Per instance, we copy only the keys the checkpoint provides (step keeps
    the value Megatron just restored)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if (
            not isinstance(sub, DistributedOptimizer)
            or not uses_torch_adam(sub)
            or sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        ):
            continue

        def set_states(model_param, tensors, sub=sub):
            group_index, group_order = sub.model_param_group_index_map[model_param]
            main_param = sub.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **sub.optimizer.state[main_param]}
            for key, value in tensors.items():
                dst[key].copy_(value)

        sub._set_main_param_and_optimizer_states = set_states


def build_scheduler(
    optimizer, opt: OptimizerSettings, training: TrainingConfig
) -> OptimizerParamScheduler:
    """Warmup + cosine/linear/constant/WSD decay, stepped once per optimizer step."""
    decay = opt.lr_decay_iters or training.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=opt.lr_wsd_decay_iters,
        lr_wsd_decay_style=opt.lr_wsd_decay_style,
    )


def guarded_step(optimizer, loss_is_finite: bool) -> tuple[bool, float]:
    """Megatron's optimizer step, but the update is skipped when the loss or the global grad
    norm is not finite (Megatron only checks that under fp16 loss scaling).

    Mirrors ChainedOptimizer.step: one global norm over all (dense + expert) optimizers, each
    clipped by it. Returns (updated, grad_norm)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm() or 0.0)
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=sub.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def prime_optimizer_state(optimizer) -> None:
    """Give every parameter of torch's Adam(W) its (zero) state, `step` included.

    Megatron's DistributedOptimizer builds its checkpoint structure from `state_dict()`, which
    without apex/TE (CPU) requires one common `step` over all parameters; a fresh optimizer has
    none, so loading a checkpoint into it would fail. The loaded values overwrite these zeros.
    TE's FusedAdam (GPU) keeps `step` per group and needs nothing (`uses_torch_adam`)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not uses_torch_adam(sub):
            continue
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault(
                        "exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )
                    state.setdefault(
                        "exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )


def unshare_adam_steps(optimizer) -> None:
    """After a checkpoint load, give every torch-Adam parameter state its own `step` tensor.

    Megatron-Core 0.16.1's distributed optimizer restores `step` for torch's Adam (no apex/TE)
    as ONE tensor object shared by all parameter states; torch then increments it in place once
    per parameter, so bias correction drifts after a resume. (Found by the kill-and-resume test.)
    Only with torch's Adam (`uses_torch_adam`)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not uses_torch_adam(sub):
            continue
        for state in sub.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
