"""Training-run configuration: schedule, optimizer, training stages, checkpoints, logging.

Fields with a Megatron-LM flag declare it (`flag(default, "--name")`, config/flags.py), and
navil-pretrain's parser is generated from them; the YAML files in examples/configs/ use the same
structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.flags import flag


@dataclass
class TrainingConfig(ConfigBase):
    """Batch geometry, length of the run, evaluation, robustness."""

    seq_length: int = flag(2048, "--seq-length")
    """Tokens per packed micro-batch sequence (images expanded into their tokens)."""
    micro_batch_size: int = flag(1, "--micro-batch-size")
    """Packs per micro-batch; several packs are concatenated into one longer THD sequence."""
    global_batch_size: int = flag(8, "--global-batch-size")
    """Packs per optimizer step summed over data-parallel ranks."""
    train_iters: int = flag(100, "--train-iters")
    """Optimizer steps of the run."""
    seed: int = flag(1234, "--seed")
    """Seed of initialisation, dropout and data order."""
    eval_interval: int = flag(0, "--eval-interval")
    """Evaluate on the validation data every this many steps (0 = never)."""
    eval_iters: int = flag(4, "--eval-iters")
    """Validation micro-batches per evaluation (the same ones every time)."""
    trim_padding: bool = flag(True, "--trim-padding")
    """Cut each micro-batch's trailing padding down to the next multiple of 16 (of the FP8 row
    multiple and of the TP size under SP, if larger) before it enters the model, so padding
    tokens do not run through every layer; loss and gradients are unchanged. Applies with
    pipeline size 1 only: with PP > 1 the stages exchange activations of the fixed
    `seq_length` shape, so the full pack is kept (said once at start-up)."""
    max_skipped_steps_in_a_row: int = 3
    """Stop the run (with a message) after this many consecutive steps with a non-finite loss
    or gradient norm; each such step is skipped (no update) and counted."""

    def validate(self) -> None:
        super().validate()
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1")
        if self.seq_length % 16:
            raise ConfigError(
                f"training.seq_length ({self.seq_length}) must be a multiple of 16 "
                "(FP8 GEMMs and the sequence-parallel split need it)"
            )

    def num_microbatches(self, dp_size: int) -> int:
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of "
                f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x {dp_size}"
            )
        return self.global_batch_size // per_step


@dataclass
class OptimizerSettings(ConfigBase):
    """AdamW through Megatron's (distributed) optimizer and LR schedule."""

    lr: float = flag(1e-4, "--lr")
    """Peak learning rate."""
    min_lr: float = flag(0.0, "--min-lr")
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = flag(0, "--lr-warmup-iters")
    """Linear warmup steps."""
    lr_decay_iters: Optional[int] = flag(None, "--lr-decay-iters")
    """Steps over which the LR decays (None = train_iters)."""
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD"] = flag(
        "cosine", "--lr-decay-style"
    )
    """Decay shape; WSD = warmup, stable, then decay over lr_wsd_decay_iters."""
    lr_wsd_decay_iters: Optional[int] = flag(None, "--lr-wsd-decay-iters")
    """Final decay steps of the WSD schedule."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """Shape of the WSD decay phase."""
    weight_decay: float = flag(0.1, "--weight-decay")
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = flag(0.9, "--adam-beta1")
    """Adam beta1."""
    adam_beta2: float = flag(0.95, "--adam-beta2")
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = flag(1.0, "--clip-grad")
    """Global gradient-norm clip (0 = off)."""
    use_distributed_optimizer: bool = flag(True, "--use-distributed-optimizer")
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = flag(False, "--overlap-grad-reduce")
    """Overlap DDP gradient reduce-scatter/all-reduce with backward (GPU)."""
    overlap_param_gather: bool = flag(False, "--overlap-param-gather")
    """Overlap the distributed optimizer's parameter all-gather with the next forward (Megatron
    DDP's forward pre-hooks wait for each bucket) instead of gathering right after the step.
    Needs --use-distributed-optimizer and --overlap-grad-reduce (Megatron's requirements)."""
    bucket_size: Optional[int] = None
    """DDP bucket size in elements (None = Megatron's default)."""

    def validate(self) -> None:
        super().validate()
        check_overlap_param_gather(
            self.overlap_param_gather, self.use_distributed_optimizer, self.overlap_grad_reduce
        )


def check_overlap_param_gather(
    overlap_param_gather: bool, use_distributed_optimizer: bool, overlap_grad_reduce: bool
) -> None:
    """Megatron's requirements of the parameter-gather overlap, as one ConfigError naming the fix
    (Megatron itself only asserts, deep inside DDP and the optimizer)."""
    if overlap_param_gather and not use_distributed_optimizer:
        raise ConfigError(
            "optimizer.overlap_param_gather overlaps the distributed optimizer's parameter "
            "all-gather, so it needs --use-distributed-optimizer (or drop --overlap-param-gather)"
        )
    if overlap_param_gather and not overlap_grad_reduce:
        raise ConfigError(
            "optimizer.overlap_param_gather needs --overlap-grad-reduce as well (Megatron "
            "supports the parameter-gather overlap only together with it), or drop "
            "--overlap-param-gather"
        )


# Parts of the model a training stage can freeze or give its own learning rate.
PARTS = ("vision", "connector", "visual_experts", "text", "special_tokens")


@dataclass
class StageConfig(ConfigBase):
    """Which parts train and at what learning-rate multiple (NaViL trains in stages)."""

    preset: Optional[Literal["stage1", "stage2", "full"]] = None
    """stage1: freeze the text LLM (text weights and token embeddings), train the vision encoder,
    connector, visual experts and special-token embeddings. stage2 / full: train everything.
    Explicit `train_*` / `*_lr_mult` fields below override the preset."""
    train_vision: Optional[bool] = None
    """Train the vision encoder (None = the preset's choice, default True)."""
    train_connector: Optional[bool] = None
    """Train the connector (mlp1)."""
    train_visual_experts: Optional[bool] = None
    """Train the visual experts (QKV/proj/q,k norms/FFN of visual tokens)."""
    train_text: Optional[bool] = None
    """Train the text LLM weights (text experts, shared norms, token embeddings, LM head)."""
    train_special_tokens: Optional[bool] = None
    """Train the 12-row special-token embedding."""
    vision_lr_mult: float = 1.0
    """LR multiplier of the vision encoder."""
    connector_lr_mult: float = 1.0
    """LR multiplier of the connector."""
    visual_experts_lr_mult: float = 1.0
    """LR multiplier of the visual experts."""
    text_lr_mult: float = 1.0
    """LR multiplier of the text weights."""
    special_tokens_lr_mult: float = 1.0
    """LR multiplier of the special-token embedding."""

    def trains(self, part: str) -> bool:
        explicit = getattr(self, f"train_{part}")
        if explicit is not None:
            return explicit
        return not (self.preset == "stage1" and part == "text")

    def lr_mult(self, part: str) -> float:
        return getattr(self, f"{part}_lr_mult")

    def validate(self) -> None:
        super().validate()
        if not any(self.trains(p) for p in PARTS):
            raise ConfigError("stage: every part is frozen; nothing would train")


@dataclass
class CheckpointConfig(ConfigBase):
    """Saving, loading and exporting checkpoints."""

    save: Optional[str] = flag(None, "--save", metavar="DIR")
    """Checkpoint root to save to (None = never save)."""
    load: Optional[str] = flag(None, "--load", metavar="DIR")
    """Checkpoint root or iter_* dir to start from. Re-running with save == load resumes from
    the latest complete checkpoint; an iter_* dir is used even when --save has newer ones (e.g.
    to step back from a damaged latest checkpoint)."""
    save_interval: int = flag(0, "--save-interval")
    """Save every this many steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0 = keep all)."""
    async_save: bool = flag(False, "--async-save")
    """Write checkpoints in the background while training continues."""
    save_hf: bool = flag(False, "--save-hf")
    """Also write a Hugging Face copy (release layout) beside each checkpoint."""
    finetune: bool = flag(False, "--finetune")
    """Load only the model weights from --load (fresh optimizer, scheduler, step and data)."""
    verify_load: bool = True
    """Check the size and CRC32 of every checkpoint file (recorded at save) before loading: a
    flipped byte inside a tensor otherwise loads silently. Costs one extra read of the files,
    split over the ranks."""
    exit_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (SLURM pre-emption) save a checkpoint after the current step and exit."""


@dataclass
class LoggingConfig(ConfigBase):
    """Metrics sinks."""

    log_interval: int = flag(1, "--log-interval")
    """Log every this many steps."""
    metrics_file: Optional[str] = flag(None, "--metrics-file", metavar="FILE")
    """JSONL file, one object per step (fields in README)."""
    tensorboard_dir: Optional[str] = flag(None, "--tensorboard-dir", metavar="DIR")
    """TensorBoard log directory (None = off)."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
    """tqdm bar on an interactive terminal; periodic log lines otherwise."""
    peak_tflops: Optional[float] = None
    """Per-device dense bf16 peak used for MFU (None = known GPU models' spec, else no MFU)."""
    fp8_peak_tflops: Optional[float] = None
    """Per-device dense FP8 peak for the second MFU figure of FP8 runs, `mfu_fp8` (None = known
    GPU models' spec: 1979 on H100/H200; else none). Unused without precision.fp8."""
