"""Parallel layout, backend and numerics; fields with a Megatron-LM flag declare it (flag(...)).

`pad_multiple_for` says what the layout and the FP8 recipe require of the sequence length."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.flags import flag

# Rows every FP8 GEMM operand must have a multiple of, per recipe (Megatron-Core's
# get_fp8_align_size: MXFP8 scales blocks of 32 elements along the row dimension too; the
# per-tensor and 128-wide block recipes need TE's general 16).
FP8_ROW_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}


GRAD_ACCUM_FUSION_NEEDS_TE = (
    "precision.gradient_accumulation_fusion needs the transformer_engine backend (its fused "
    "wgrad GEMMs; the local backend's would need apex's CUDA extension): set "
    "precision.backend=transformer_engine on a GPU with TE, or --no-gradient-accumulation-fusion"
)


@dataclass
class ParallelConfig(ConfigBase):
    """How the model is split over processes."""

    tensor_model_parallel_size: int = flag(1, "--tensor-model-parallel-size")
    """TP size: attention heads, FFN columns and the vocab are split over this many ranks."""
    pipeline_model_parallel_size: int = flag(1, "--pipeline-model-parallel-size")
    """PP size: LLM layers are split into this many stages; the vision encoder and connector
    live on the first stage."""
    virtual_pipeline_model_parallel_size: Optional[int] = flag(
        None, "--virtual-pipeline-model-parallel-size"
    )
    """Model chunks per pipeline rank for the interleaved 1F1B schedule (None = plain 1F1B)."""
    num_layers_in_first_pipeline_stage: Optional[int] = flag(
        None, "--decoder-first-pipeline-num-layers"
    )
    """LLM layers on the first stage (None = even split). The vision encoder also lives there, so
    giving the first stage fewer LLM layers balances the pipeline."""
    expert_model_parallel_size: int = flag(1, "--expert-model-parallel-size")
    """EP size: 2 puts the text and visual FFN experts on different ranks; 1 uses the
    dispatcher-free fast path."""
    sequence_parallel: bool = flag(False, "--sequence-parallel")
    """Split norms/dropout activations along the sequence over the TP ranks (needs TP > 1;
    required by Megatron's MoE dispatchers when TP > 1 and EP > 1)."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """Megatron MoE token dispatcher used when EP > 1."""
    recompute_granularity: Optional[Literal["full", "selective"]] = flag(
        None, "--recompute-granularity"
    )
    """Activation recompute: `full` recomputes whole layers, `selective` only core attention."""
    recompute_method: Literal["uniform", "block"] = flag("uniform", "--recompute-method")
    """With full recompute: `uniform` checkpoints groups of recompute_num_layers layers,
    `block` checkpoints only the first recompute_num_layers layers of each stage."""
    recompute_num_layers: int = flag(1, "--recompute-num-layers")
    """Layers per recompute group (uniform) or recomputed layers per stage (block)."""

    def validate(self) -> None:
        super().validate()
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        if self.expert_model_parallel_size not in (1, 2):
            raise ConfigError(
                "parallel.expert_model_parallel_size must be 1 or 2: NaViL has exactly two FFN "
                f"experts (text, visual), got {self.expert_model_parallel_size}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        if (
            self.expert_model_parallel_size > 1
            and self.tensor_model_parallel_size > 1
            and not self.sequence_parallel
        ):
            raise ConfigError(
                "EP > 1 with TP > 1 needs --sequence-parallel (Megatron's MoE token dispatchers "
                "expect sequence-parallel inputs)"
            )


@dataclass
class PrecisionConfig(ConfigBase):
    """Backend choice and numerics."""

    backend: Literal["auto", "local", "transformer_engine"] = "auto"
    """`local`: pure-torch Megatron layers (CPU, CI). `transformer_engine`: TE linears, fused
    THD attention, FP8 (GPU). `auto` picks TE when CUDA and TE are both present."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = flag(
        "float32", "--bf16", const="bfloat16"
    )
    """Parameter/compute dtype of the model (bf16 on GPU for training, fp32 on CPU)."""
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise", "mxfp8"]] = flag(
        None, "--fp8-recipe"
    )
    """FP8 recipe through Transformer Engine (None = off). Needs the TE backend."""
    fp8_padding_multiple: Optional[int] = None
    """With FP8 every GEMM's row count is padded to a multiple of this (None = what the recipe
    needs: 32 for mxfp8, 16 otherwise; an explicit value must be a multiple of that)."""
    bias_swiglu_fusion: Optional[bool] = flag(None, "--bias-swiglu-fusion")
    """Run the LLM's SwiGLU (dense MLP and both FFN experts) as Megatron's fused kernel
    (TransformerConfig.bias_activation_fusion; torch.compile'd, no TE needed). None = on with the
    transformer_engine backend, off with local (the unfused reference; on CPU the compile costs
    about 15 s per process). The ViT's exact GELU is never fused: Megatron's fused GELU is the
    tanh approximation, and the released encoder uses erf."""
    gradient_accumulation_fusion: Optional[bool] = flag(None, "--gradient-accumulation-fusion")
    """Accumulate weight gradients straight into Megatron DDP's fp32 main_grad inside the wgrad
    GEMM (TE's fuse_wgrad_accumulation) instead of a separate grad tensor plus an add. None = on
    when navil-pretrain trains on the transformer_engine backend (Megatron DDP provides
    main_grad); off for a bare model (demo, tools: no DDP, no main_grad). Needs Transformer
    Engine: refused with the local backend."""
    lm_head_loss_chunk_rows: int = flag(4096, "--lm-head-loss-chunk-rows")
    """Run the LM head and the cross entropy together, this many loss rows at a time, with the
    logits recomputed in backward (models/head_loss.py): never a whole [rows, vocab] logits
    tensor nor its fp32 copies (3 GB each at 8k rows and a 92k vocabulary), for one more head
    GEMM. 0 = the plain path (all logits at once, Megatron's vocab-parallel cross entropy). Same
    losses and gradients either way (tests/models/test_head_loss.py)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""

    def validate(self) -> None:
        super().validate()
        if self.gradient_accumulation_fusion and self.backend == "local":
            raise ConfigError(GRAD_ACCUM_FUSION_NEEDS_TE)
        if self.lm_head_loss_chunk_rows < 0:
            raise ConfigError(
                f"precision.lm_head_loss_chunk_rows must be >= 0 (0 = off), got "
                f"{self.lm_head_loss_chunk_rows}"
            )
        if self.fp8 is not None and self.backend == "local":
            raise ConfigError("precision.fp8 needs backend transformer_engine (or auto on a GPU)")
        if self.fp8 is not None and self.fp8_padding_multiple is not None:
            need = FP8_ROW_MULTIPLE[self.fp8]
            if self.fp8_padding_multiple <= 0 or self.fp8_padding_multiple % need:
                raise ConfigError(
                    f"precision.fp8_padding_multiple {self.fp8_padding_multiple} does not suit "
                    f"fp8 recipe {self.fp8!r}: it needs a positive multiple of {need} (leave it "
                    "unset to use the recipe's own)"
                )

    def row_multiple(self) -> int:
        """Rows every modality-split GEMM and the packed sequence are padded to (1 without FP8)."""
        if self.fp8 is None:
            return 1
        return self.fp8_padding_multiple or FP8_ROW_MULTIPLE[self.fp8]


def check_pipeline_split(num_layers: int, parallel: ParallelConfig) -> None:
    """Can `num_layers` LLM layers be split over the pipeline stages of `parallel`? The rules of
    Megatron-Core's `get_num_layers_to_build` (which only asserts, deep inside model building):
    an even split needs num_layers % PP == 0; with `num_layers_in_first_pipeline_stage` the
    remaining layers split evenly over the other stages; with virtual stages each stage's layers
    split evenly over its chunks. Raises ConfigError naming the numbers."""
    pp, vp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size
    first = parallel.num_layers_in_first_pipeline_stage
    if num_layers < pp:
        raise ConfigError(
            f"{num_layers} LLM layers cannot fill --pipeline-model-parallel-size {pp} stages"
        )
    if first is not None and pp > 1:
        rest = num_layers - first
        if first < 0 or rest < 0 or rest % (pp - 1):
            raise ConfigError(
                f"--decoder-first-pipeline-num-layers {first}: the other {rest} of {num_layers} "
                f"LLM layers must split evenly over the remaining {pp - 1} pipeline stages"
            )
        return
    if num_layers % pp:
        raise ConfigError(
            f"{num_layers} LLM layers do not split evenly over --pipeline-model-parallel-size "
            f"{pp} (Megatron builds num_layers // PP per stage); pick a PP that divides "
            f"{num_layers} or set --decoder-first-pipeline-num-layers"
        )
    if vp is not None and pp > 1 and (num_layers // pp) % vp:
        raise ConfigError(
            f"{num_layers // pp} LLM layers per pipeline stage do not split over "
            f"--virtual-pipeline-model-parallel-size {vp} chunks"
        )


def pad_multiple_for(
    tensor_model_parallel_size: int = 1, sequence_parallel: bool = False, fp8_row_multiple: int = 1
) -> int:
    """Smallest multiple the sequence length must honour: the FP8 recipe's row multiple (16, or
    32 for MXFP8; 1 without FP8), and the TP size under SP (lcm of both)."""
    m = fp8_row_multiple
    if sequence_parallel:
        m = m * tensor_model_parallel_size // math.gcd(m, tensor_model_parallel_size)
    return m
