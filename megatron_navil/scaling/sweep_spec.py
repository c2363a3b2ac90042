"""The grid of a scaling sweep (a YAML or JSON file; every field documented).

    flavor: debug-internlm2
    llm:   {s: {hidden_size: 32, ...}, m: {hidden_size: 64, ...}}     # label -> model.llm fields
    vit:   {s: {hidden_size: 16, ...}, m: {...}}                      # label -> model.vision fields
    budgets_samples: [2000, 8000]
Each (llm, vit, budget) is one navil-pretrain run (a cell) with its own LR schedule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_navil.config.base import ConfigBase, ConfigError, load_yaml
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.model_section import ModelSection


@dataclass
class SweepSpec(ConfigBase):
    """An (LLM size x ViT size x data budget) grid of navil-pretrain runs."""

    flavor: str = "debug-internlm2"
    """The flavor every cell starts from (navil-pretrain --model)."""
    llm: dict[str, Any] = field(default_factory=dict)
    """LLM sizes: label -> model.llm fields set on the flavor (e.g. hidden_size, num_layers)."""
    vit: dict[str, Any] = field(default_factory=dict)
    """ViT sizes: label -> model.vision fields set on the flavor."""
    budgets_samples: tuple[int, ...] = ()
    """Data budgets in training samples; each cell trains about this many."""
    samples_per_pack: Optional[float] = None
    """Mean samples per packed sequence, to turn budgets into steps (None: measured on the mock
    data; required with real data: navil-inspect or a short run's metrics give it)."""
    seq_length: int = 256
    """navil-pretrain --seq-length."""
    global_batch_size: int = 4
    """navil-pretrain --global-batch-size (packs per step)."""
    lr: float = 2e-3
    """Peak learning rate (the same for every cell)."""
    min_lr: float = 1e-4
    """Learning rate at the end of each cell's cosine decay."""
    warmup_fraction: float = 0.05
    """Share of each cell's steps spent in linear warmup."""
    num_evals: int = 4
    """Validation points per cell, at equal step intervals; the last at the end."""
    eval_iters: int = 2
    """Validation micro-batches per evaluation (the same ones every time)."""
    seed: int = 1234
    """navil-pretrain --seed (the same data order for every cell)."""
    mock_data: bool = True
    """Train on navil-pretrain's mock packs; else data_path / valid_data_path / tokenizer."""
    data_path: tuple[str, ...] = ()
    """navil-pretrain --data-path words (directories, optionally weighted)."""
    valid_data_path: tuple[str, ...] = ()
    """navil-pretrain --valid-data-path."""
    tokenizer: Optional[str] = None
    """navil-pretrain --tokenizer-model."""
    nproc_per_cell: int = 1
    """Processes per cell (torchrun --nproc_per_node when > 1; one node per cell)."""
    checkpoint_interval: int = 0
    """Save a checkpoint every this many steps so an interrupted cell resumes (0: a cell that
    is interrupted starts over)."""
    extra_args: tuple[str, ...] = ()
    """More navil-pretrain arguments for every cell (flags or section.field=value)."""

    @classmethod
    def load(cls, path: str) -> "SweepSpec":
        try:
            with open(path) as f:
                data = load_yaml(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read sweep spec {path}: {e.strerror}") from None
        spec = cls.from_dict(data or {}, path=path)
        spec.validate()
        return spec

    def validate(self) -> None:
        super().validate()
        for name in ("llm", "vit"):
            sizes = getattr(self, name)
            if not sizes:
                raise ConfigError(f"sweep spec: `{name}` lists no sizes")
            for label, fields in sizes.items():
                if not isinstance(fields, dict):
                    raise ConfigError(f"sweep spec: {name}.{label} must map field -> value")
        if not self.budgets_samples or min(self.budgets_samples) < 1:
            raise ConfigError("sweep spec: budgets_samples needs at least one positive budget")
        if not self.mock_data and (not self.data_path or self.tokenizer is None):
            raise ConfigError("sweep spec: real data needs data_path and tokenizer")
        if not self.mock_data and self.samples_per_pack is None:
            raise ConfigError(
                "sweep spec: set samples_per_pack for real data (the metrics of a short "
                "navil-pretrain run give it: num_samples / packs per step)"
            )
        if self.num_evals < 1 or self.nproc_per_cell < 1 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError("sweep spec: num_evals, nproc_per_cell >= 1; warmup_fraction < 1")
        for label, size in self.sections().items():
            size.resolve().validate()  # every model of the grid is buildable

    def sections(self) -> dict[tuple[str, str], ModelSection]:
        """(llm label, vit label) -> the model section of that pair."""
        out = {}
        for (ll, lf), (vl, vf) in itertools.product(self.llm.items(), self.vit.items()):
            fields = {f"llm.{k}": v for k, v in lf.items()}
            fields.update({f"vision.{k}": v for k, v in vf.items()})
            out[(ll, vl)] = ModelSection(flavor=self.flavor).apply_overrides(fields, parse=False)
        return out


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    index: int
    """Position in the grid (the SLURM array task id)."""
    llm: str
    vit: str
    budget: int
    """Budget in samples."""
    fields: dict
    """model.* fields of this cell (dotted, without the `model.` prefix)."""
    train_iters: int
    eval_interval: int

    @property
    def id(self) -> str:
        return f"{self.llm}__{self.vit}__{self.budget}"


def model_sizes(cfg: NaViLModelConfig) -> tuple[int, int]:
    """(LLM size, ViT size) in parameters, as the paper counts them (shapes.py)."""
    return cfg.llm.num_parameters()[0], cfg.vision.num_parameters()


def steps_for(spec: SweepSpec, budget: int, samples_per_pack: float) -> tuple[int, int]:
    """(train_iters, eval_interval): the multiple of num_evals steps nearest to `budget`
    samples, so the last step is an evaluation."""
    iters = budget / (spec.global_batch_size * samples_per_pack)
    interval = max(1, round(iters / spec.num_evals))
    return interval * spec.num_evals, interval


def grid(spec: SweepSpec, samples_per_pack: float) -> list[Cell]:
    cells = []
    sections = spec.sections()
    for ll, vl, budget in itertools.product(spec.llm, spec.vit, spec.budgets_samples):
        iters, interval = steps_for(spec, budget, samples_per_pack)
        fields = dict(sections[(ll, vl)].explicit)
        cells.append(Cell(len(cells), ll, vl, budget, fields, iters, interval))
    return cells
