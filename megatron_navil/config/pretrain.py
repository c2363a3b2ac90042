"""The navil-pretrain run config: one YAML file (examples/configs/), overridable from the CLI.

    model:      {flavor: debug-internlm2, overrides: {llm.num_layers: 8}}
    parallel / precision / training / optimizer / stage / data / checkpoint / logging
    tokenizer:  path of the NaViL tokenizer (navil-tokenizer output dir or tokenizer.model)
    mock_data:  train on synthetic packs (no files; benchmarks and smoke tests)

`training.seq_length` and `training.seed` are the single source of the sequence length and seed:
the data section's copies are set from them (and `data.pad_multiple` from the parallel layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.data import DataConfig, pad_multiple_for
from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
from megatron_navil.config.training import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerSettings,
    StageConfig,
    TrainingConfig,
)


@dataclass
class ModelSection(ConfigBase):
    """Which model to build."""

    flavor: str = "debug-internlm2"
    """A named flavor (megatron_navil.config.FLAVORS) the overrides start from."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of the flavor's fields, e.g. {"llm.num_layers": 8}."""


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
    tokenizer: Optional[str] = None
    """NaViL tokenizer directory (navil-tokenizer) or its tokenizer.model."""
    mock_data: bool = False
    """Train on synthetic packs (random pixels and tokens) instead of data.train_paths."""

    def resolved_model(self, vocabulary: Optional[tuple[int, int]] = None) -> NaViLModelConfig:
        """The flavor, its overrides, and with a tokenizer the vocabulary it has: `vocabulary`
        = (vocab_size, first_special_token_id) as megatron_navil.data.tokenizer.
        configured_vocabulary reads it (config stays free of file formats). Required when
        `tokenizer` is set, so no caller gets the flavor's vocabulary by mistake."""
        if self.tokenizer is not None and vocabulary is None:
            raise TypeError(
                "resolved_model: this config names a tokenizer; pass "
                "vocabulary=configured_vocabulary(cfg.tokenizer)"
            )
        cfg = self._flavor_model()
        if vocabulary is not None:
            cfg = self._follow_tokenizer(cfg, *vocabulary)
        cfg.validate()
        return cfg

    def _flavor_model(self) -> NaViLModelConfig:
        """The flavor with its overrides, not yet validated: with a tokenizer, the vocabulary
        fields are only complete once it is followed."""
        cfg = get_flavor(self.model.flavor)
        if self.model.overrides:
            cfg = cfg.apply_overrides(self.model.overrides)
        return cfg

    def _follow_tokenizer(self, cfg: NaViLModelConfig, size: int, first: int) -> NaViLModelConfig:
        """llm.first_special_token_id = the tokenizer's; llm.vocab_size = the tokenizer's size,
        unless the model has more rows for the same special-token position (Qwen3's padded
        embedding) or an explicit override asks for more. Contradictions are an error."""
        explicit = {
            k: v
            for k, v in self.model.overrides.items()
            if k in ("llm.vocab_size", "llm.first_special_token_id")
        }
        llm = cfg.llm
        if "llm.first_special_token_id" in explicit and llm.first_special_token_id != first:
            raise ConfigError(
                f"model.llm.first_special_token_id={llm.first_special_token_id} contradicts "
                f"--tokenizer-model {self.tokenizer}, whose special tokens start at {first}: drop "
                "the override (the model follows its tokenizer) or use the model's own tokenizer"
            )
        if "llm.vocab_size" in explicit and llm.vocab_size < size:
            raise ConfigError(
                f"model.llm.vocab_size={llm.vocab_size} is smaller than --tokenizer-model "
                f"{self.tokenizer} ({size} ids): drop the override or use the model's tokenizer"
            )
        keep_rows = "llm.vocab_size" in explicit or (
            llm.first_special_token_id == first and llm.vocab_size >= size
        )
        return cfg.apply_overrides(
            {
                "llm.first_special_token_id": first,
                "llm.vocab_size": llm.vocab_size if keep_rows else size,
            }
        )

    def resolved_data(self) -> DataConfig:
        pad = pad_multiple_for(
            self.parallel.tensor_model_parallel_size,
            self.parallel.sequence_parallel,
            self.precision.row_multiple(),
        )
        return self.data.replace(
            seq_length=self.training.seq_length, seed=self.training.seed, pad_multiple=pad
        )

    def validate(self) -> None:
        super().validate()
        model = self._flavor_model()
        if self.tokenizer is None:  # else resolved_model validates it with the vocabulary
            model.validate()
        t = self.training
        seq = t.seq_length * t.micro_batch_size
        if seq > model.llm.max_sequence_length:
            raise ConfigError(
                f"--seq-length x --micro-batch-size = {seq} exceeds the model's "
                f"llm.max_sequence_length {model.llm.max_sequence_length}; set "
                f"model.overrides llm.max_sequence_length or lower them"
            )
        self.resolved_data().validate()
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
