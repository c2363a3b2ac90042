"""The TP x PP x EP x DP layouts of a GPU count, and whether the project would run each.

`check_layout` asks the project's own rules, in the order a job meets them, and returns the
first refusal as one line (None when the layout runs):
1. ParallelConfig.validate: EP in {1, 2}, SP needs TP > 1, EP with TP needs SP;
2. utils.distributed.data_parallel_size: world divisible by TP x PP, EP dividing DP
   (Megatron's group set-up);
3. config.parallel.check_pipeline_split: LLM layers split over the stages (Megatron asserts);
4. config.model.padded_vocab_size: the padded vocabulary divisible by TP;
5. conversion.plan.check_layout: every parameter (heads, KV groups, FFN columns, vision heads)
   splits over TP;
6. Megatron-Core's own TransformerConfig for the LLM and the vision encoder;
7. the run config navil-pretrain would validate (PretrainConfig.validate: the sequence length
   multiple under SP, micro-batch x sequence within the model's limit) and the global batch
   over DP (TrainingConfig.num_microbatches).
So the planner accepts exactly what navil-pretrain would start (tests/scaling/test_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import NaViLModelConfig, padded_vocab_size
from megatron_navil.config.model_section import ModelSection
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig, check_pipeline_split
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.config.training import TrainingConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.plan import check_layout as check_param_splits
from megatron_navil.scaling.spec import WorkloadSpec
from megatron_navil.utils.distributed import data_parallel_size


@dataclass(frozen=True)
class Layout:
    """One way to lay a job over its GPUs (sequence parallelism whenever TP > 1)."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    ep: int
    """Expert-parallel size (1 or 2: the text and visual FFN experts)."""
    dp: int
    """Data-parallel size (GPUs / (TP x PP))."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            expert_model_parallel_size=self.ep,
            sequence_parallel=self.tp > 1,
        )

    @property
    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} EP{self.ep} DP{self.dp}"

    def flags(self) -> list[str]:
        """navil-pretrain flags of this layout."""
        out = [
            "--tensor-model-parallel-size",
            str(self.tp),
            "--pipeline-model-parallel-size",
            str(self.pp),
            "--expert-model-parallel-size",
            str(self.ep),
        ]
        return out + (["--sequence-parallel"] if self.tp > 1 else [])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(num_gpus: int, max_tp: Optional[int] = None) -> list[Layout]:
    """Every (TP, PP, EP, DP) with TP x PP x DP = num_gpus, EP in {1, 2}; TP up to `max_tp`."""
    out = []
    for tp in _divisors(num_gpus):
        if max_tp is not None and tp > max_tp:
            continue
        for pp in _divisors(num_gpus // tp):
            for ep in (1, 2):
                out.append(Layout(tp, pp, ep, num_gpus // (tp * pp)))
    return out


def run_config(
    section: ModelSection, layout: Layout, w: WorkloadSpec, micro_batch_size: int = 1
) -> PretrainConfig:
    """The navil-pretrain run config of a layout (mock data: the data is not the planner's)."""
    return PretrainConfig(
        model=section,
        parallel=layout.parallel(),
        precision=PrecisionConfig(params_dtype=w.dtype),
        training=TrainingConfig(
            seq_length=w.seq_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=w.global_batch_size,
        ),
        mock_data=True,
    )


def check_layout(
    cfg: NaViLModelConfig, section: ModelSection, layout: Layout, w: WorkloadSpec
) -> Optional[str]:
    """None when navil-pretrain would run `layout`, else the first rule's refusal (one line)."""
    from megatron_navil.models.transformer_config import (
        llm_transformer_config,
        vision_transformer_config,
    )

    parallel = layout.parallel()
    try:
        parallel.validate()
        data_parallel_size(parallel, layout.world)
        check_pipeline_split(cfg.llm.num_layers, parallel)
        padded_vocab_size(cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by, layout.tp)
        check_param_splits(cfg, parallel)
        precision = PrecisionConfig(params_dtype=w.dtype)
        # Megatron's own checks; the backend only switches kernels, not these rules.
        llm_transformer_config(cfg, parallel, precision, "local")
        vision_transformer_config(cfg, parallel, precision, "local")
        run = run_config(section, layout, w)
        run.validate()
        run.training.num_microbatches(layout.dp)
    except (ConfigError, ConversionError, ValueError, AssertionError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return None
