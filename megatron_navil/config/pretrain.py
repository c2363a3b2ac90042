"""The navil-pretrain run config: one YAML file (examples/configs/), overridable from the CLI.

    model:      {flavor: debug-internlm2, llm: {num_layers: 8}}   (config/model_section.py)
    parallel / precision / training / optimizer / stage / data / checkpoint / logging
    tokenizer:  path of the NaViL tokenizer (navil-tokenizer output dir or tokenizer.model)
    mock_data:  train on synthetic packs (no files; benchmarks and smoke tests)

Every fact has one home, so nothing is silently overwritten: the sequence length and the seed
are `training.seq_length` / `training.seed` (the loaders get them as arguments), the multiple
the sequence length must honour follows from the parallel layout and the FP8 recipe
(`seq_multiple()`), the image patch limits are the model's (`model.min_dynamic_patch`).
`from_saved` reads the run config a checkpoint recorded, also in the older form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.data import DataConfig
from megatron_navil.config.flags import flag
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.model_section import ModelSection
from megatron_navil.config.parallel import (
    ParallelConfig,
    PrecisionConfig,
    check_pipeline_split,
    pad_multiple_for,
)
from megatron_navil.config.training import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerSettings,
    StageConfig,
    TrainingConfig,
)


@dataclass
class PretrainConfig(ConfigBase):
    """Everything navil-pretrain needs."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Backend and numerics."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch geometry and length of the run."""
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    """Optimizer and LR schedule."""
    stage: StageConfig = field(default_factory=StageConfig)
    """Which parts train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training/validation data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics."""
    tokenizer: Optional[str] = flag(None, "--tokenizer-model", metavar="PATH")
    """NaViL tokenizer directory (navil-tokenizer) or its tokenizer.model."""
    mock_data: bool = flag(False, "--mock-data")
    """Train on synthetic packs (random pixels and tokens) instead of data.train_paths."""

    def resolved_model(self, vocabulary: Optional[tuple[int, int]] = None) -> NaViLModelConfig:
        """The flavor with the model fields set on it, and with a tokenizer the vocabulary it
        has: `vocabulary` = (vocab_size, first_special_token_id) as
        megatron_navil.data.tokenizer.configured_vocabulary reads it (config stays free of file
        formats). Required when `tokenizer` is set, so no caller gets the flavor's vocabulary
        by mistake."""
        if self.tokenizer is not None and vocabulary is None:
            raise TypeError(
                "resolved_model: this config names a tokenizer; pass "
                "vocabulary=configured_vocabulary(cfg.tokenizer)"
            )
        cfg = self.model.resolve()
        if vocabulary is not None:
            cfg = self._follow_tokenizer(cfg, *vocabulary)
        cfg.validate()
        return cfg

    def _follow_tokenizer(self, cfg: NaViLModelConfig, size: int, first: int) -> NaViLModelConfig:
        """llm.first_special_token_id = the tokenizer's; llm.vocab_size = the tokenizer's size,
        unless the model has more rows for the same special-token position (Qwen3's padded
        embedding) or an explicit setting asks for more. Contradictions are an error."""
        llm = cfg.llm
        if self.model.is_set("llm.first_special_token_id") and llm.first_special_token_id != first:
            raise ConfigError(
                f"model.llm.first_special_token_id={llm.first_special_token_id} contradicts "
                f"--tokenizer-model {self.tokenizer}, whose special tokens start at {first}: drop "
                "the setting (the model follows its tokenizer) or use the model's own tokenizer"
            )
        if self.model.is_set("llm.vocab_size") and llm.vocab_size < size:
            raise ConfigError(
                f"model.llm.vocab_size={llm.vocab_size} is smaller than --tokenizer-model "
                f"{self.tokenizer} ({size} ids): drop the setting or use the model's tokenizer"
            )
        keep_rows = self.model.is_set("llm.vocab_size") or (
            llm.first_special_token_id == first and llm.vocab_size >= size
        )
        return cfg.apply_overrides(
            {
                "llm.first_special_token_id": first,
                "llm.vocab_size": llm.vocab_size if keep_rows else size,
            }
        )

    def seq_multiple(self) -> int:
        """What training.seq_length must be a multiple of: the FP8 recipe's row multiple and,
        under sequence parallelism, the TP size (their lcm)."""
        return pad_multiple_for(
            self.parallel.tensor_model_parallel_size,
            self.parallel.sequence_parallel,
            self.precision.row_multiple(),
        )

    def validate(self) -> None:
        super().validate()
        model = self.model.resolve()
        if self.tokenizer is None:  # else resolved_model validates it with the vocabulary
            model.validate()
        # Megatron only asserts this while building the model: refuse it here, in one line.
        check_pipeline_split(model.llm.num_layers, self.parallel)
        t = self.training
        seq = t.seq_length * t.micro_batch_size
        if seq > model.llm.max_sequence_length:
            raise ConfigError(
                f"--seq-length x --micro-batch-size = {seq} exceeds the model's "
                f"llm.max_sequence_length {model.llm.max_sequence_length}; set "
                f"model.llm.max_sequence_length or lower them"
            )
        multiple = self.seq_multiple()
        if t.seq_length % multiple:
            raise ConfigError(
                f"--seq-length {t.seq_length} must be a multiple of {multiple} (the FP8 "
                "recipe's row multiple, times the TP size under --sequence-parallel)"
            )
        decay = self.optimizer.lr_decay_iters or t.train_iters
        if self.optimizer.lr_warmup_iters >= decay:
            raise ConfigError(
                f"--lr-warmup-iters {self.optimizer.lr_warmup_iters} must be smaller than the "
                f"decay length {decay} (--lr-decay-iters, default --train-iters)"
            )
        if not self.mock_data:
            if not self.data.train_paths:
                raise ConfigError(
                    "no training data: pass --data-path (navil-preprocess output "
                    "directories) or --mock-data"
                )
            if self.tokenizer is None:
                raise ConfigError(
                    "--tokenizer-model is required with real data (the loader "
                    "tokenizes text and chat turns)"
                )
        if t.eval_interval and not (self.data.valid_paths or self.mock_data):
            raise ConfigError("--eval-interval needs --valid-data-path")
        c = self.checkpoint
        if c.save_hf and not c.save:
            raise ConfigError("--save-hf needs --save")

    # ------------------------------------------------------------------ saved run configs
    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "PretrainConfig":
        """The run config a checkpoint recorded (navil_checkpoint.json `config`), in the current
        form or the older one (`model.overrides`, data.seq_length / seed / pad_multiple /
        min_dynamic_patch / max_dynamic_patch)."""
        return cls.from_dict(_upgrade_saved(data))

    def changes_from(self, other: "PretrainConfig") -> list[str]:
        """`field: theirs -> ours` for every field that differs from `other` (a model field set
        on one side only shows `(flavor)` on the other)."""
        a, b = _flat(other.to_dict()), _flat(self.to_dict())
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b or a[k] != b[k]:
                theirs = repr(a[k]) if k in a else "(flavor)"
                ours = repr(b[k]) if k in b else "(flavor)"
                out.append(f"{k}: {theirs} -> {ours}")
        return out


def _upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A run config saved before the model section was typed, in today's form. Before, the
    model section was `{flavor, overrides: {dotted: value}}`, and the data section held copies
    the job overwrote (seq_length, seed, pad_multiple: dropped, their homes are saved too) and
    patch limits that won over the model's when set (moved to the model section)."""
    data = copy.deepcopy(data)
    old_data = data.get("data")
    moved = {}
    if isinstance(old_data, dict):
        for key in ("seq_length", "seed", "pad_multiple"):
            old_data.pop(key, None)
        for key in ("min_dynamic_patch", "max_dynamic_patch"):
            value = old_data.pop(key, None)
            if value is not None:
                moved[key] = value
    model = data.get("model")
    if isinstance(model, dict) and "overrides" in model:
        section = ModelSection.from_dict({k: v for k, v in model.items() if k != "overrides"})
        model = section.apply_overrides(model["overrides"] or {}, parse=False).to_dict()
    if moved:
        model = {**(model or {}), **moved}
    if model is not None:
        data["model"] = model
    return data


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
