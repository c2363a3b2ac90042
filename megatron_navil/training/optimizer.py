"""Megatron optimizer (AdamW, optionally distributed) and its LR/WD scheduler."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_navil.config.parallel import PrecisionConfig
from megatron_navil.config.training import OptimizerSettings, StageConfig, TrainingConfig
from megatron_navil.training.stages import lr_overrides

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_optimizer(chunks: list, opt: OptimizerSettings, stage: StageConfig,
                    precision: PrecisionConfig):
    dtype = _DTYPES[precision.params_dtype]
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
    return get_megatron_optimizer(config, chunks, config_overrides=lr_overrides(stage, opt))


def build_scheduler(optimizer, opt: OptimizerSettings, training: TrainingConfig) -> OptimizerParamScheduler:
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
