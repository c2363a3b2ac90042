"""`navil-scaling plan`: the layouts that fit a cluster, ranked by predicted step time.

For every candidate layout (layouts.py) the project's rules decide whether it runs at all; for
each one that does, every micro-batch size (powers of two dividing the batch per DP rank) with
and without full recompute is costed (memory.py, steptime.py), the fastest choice that fits the
GPU's usable memory is kept, and layouts are ranked by predicted step time. Layouts that run
but fit in no choice are listed with the smallest memory they would need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_navil.config.model_section import ModelSection
from megatron_navil.scaling.layouts import Layout, candidate_layouts, check_layout, run_config
from megatron_navil.scaling.memory import StageMemory, layout_memory
from megatron_navil.scaling.shapes import llm_size_billion, vision_size_billion
from megatron_navil.scaling.spec import GIB, ClusterSpec, WorkloadSpec
from megatron_navil.scaling.steptime import StepTime, predict_step
from megatron_navil.scaling.throughput import ThroughputTable


@dataclass
class Choice:
    """One runnable layout with its best micro-batch size and recompute choice."""

    layout: Layout
    micro_batch_size: int
    recompute: bool
    num_microbatches: int
    stages: list[StageMemory]
    time: StepTime

    @property
    def peak_bytes(self) -> float:
        return max(s.total for s in self.stages)

    def to_dict(self) -> dict:
        worst = max(self.stages, key=lambda s: s.total)
        return {
            "layout": self.layout.label,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "ep": self.layout.ep,
            "dp": self.layout.dp,
            "sequence_parallel": self.layout.tp > 1,
            "micro_batch_size": self.micro_batch_size,
            "recompute": "full" if self.recompute else None,
            "num_microbatches": self.num_microbatches,
            "peak_gib": self.peak_bytes / GIB,
            "peak_stage": worst.stage,
            "memory_gib": {k: v / GIB for k, v in _breakdown(worst).items()},
            "stages": [s.to_dict() for s in self.stages],
            "time": self.time.to_dict(),
        }


def pretrain_args(section: ModelSection, w: WorkloadSpec, choice: Choice) -> list[str]:
    """The navil-pretrain arguments that run the planned model at this choice (data, schedule
    and checkpoint flags are the user's)."""
    args = ["--model", section.flavor]
    args += [f"model.{k}={v}" for k, v in sorted(section.explicit.items())]
    args += choice.layout.flags()
    args += ["--seq-length", str(w.seq_length), "--global-batch-size", str(w.global_batch_size)]
    args += ["--micro-batch-size", str(choice.micro_batch_size)]
    if choice.recompute:
        args += ["--recompute-granularity", "full"]
    if w.dtype == "bfloat16":
        args.append("--bf16")
    if w.stage != "full":
        args.append(f"stage.preset={w.stage}")
    if not w.use_distributed_optimizer:
        args.append("--no-use-distributed-optimizer")
    if w.overlap_grad_reduce:
        args.append("--overlap-grad-reduce")
    return args


def _breakdown(s: StageMemory) -> dict:
    return {
        "parameters": s.parameters,
        "gradients": s.gradients,
        "optimizer": s.optimizer,
        "activations_per_micro_batch": s.activations_per_micro_batch,
        "activations_no_recompute": s.activations_no_recompute,
        "activations_full_recompute": s.activations_full_recompute,
        "in_flight_activations": s.in_flight * s.activations_per_micro_batch,
        "working": s.working,
        "vision_static": s.vision_static,
        "vision_activations": s.vision_activations,
        "total": s.total,
    }


@dataclass
class Plan:
    """The planner's answer: ranked runnable layouts, refusals with reasons, notes."""

    section: ModelSection
    cluster: ClusterSpec
    workload: WorkloadSpec
    throughput_source: str
    ranked: list[Choice] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(layout, the rule's reason)."""
    too_big: list[tuple[str, float, str]] = field(default_factory=list)
    """(layout, smallest peak GiB over the choices, that choice)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        cfg = self.section.resolve()
        total, active = cfg.num_parameters()
        return {
            "model": {
                "section": self.section.to_dict(),
                "llm_billion": llm_size_billion(cfg),
                "vision_billion": vision_size_billion(cfg),
                "total_billion": total / 1e9,
                "activated_billion": active / 1e9,
            },
            "cluster": self.cluster.to_dict(),
            "workload": self.workload.to_dict(),
            "throughput_source": self.throughput_source,
            "ranked": [
                {
                    **c.to_dict(),
                    "navil_pretrain_args": pretrain_args(self.section, self.workload, c),
                }
                for c in self.ranked
            ],
            "refused": [{"layout": k, "reason": r} for k, r in self.refused],
            "too_big": [{"layout": k, "min_peak_gib": g, "with": w} for k, g, w in self.too_big],
            "notes": self.notes,
        }


def _micro_batch_sizes(w: WorkloadSpec, dp: int) -> list[int]:
    per_rank = w.global_batch_size // dp if w.global_batch_size % dp == 0 else 0
    out, m = [], 1
    while m <= per_rank:
        if per_rank % m == 0:
            out.append(m)
        m *= 2
    return out


def best_choice(
    cfg, section, layout: Layout, w: WorkloadSpec, cluster: ClusterSpec, table: ThroughputTable
) -> tuple[Optional[Choice], Optional[tuple[float, str]]]:
    """(the fastest choice that fits, None) or (None, (smallest peak bytes, its choice))."""
    best, smallest = None, None
    for mbs in _micro_batch_sizes(w, layout.dp):
        run = run_config(section, layout, w, mbs)
        try:
            run.validate()  # micro-batch x sequence within the model's limit
        except ValueError:
            continue
        m = run.training.num_microbatches(layout.dp)
        for recompute in (False, True):
            stages = layout_memory(cfg, layout.parallel(), w, layout.dp, mbs, m, recompute)
            peak = max(s.total for s in stages)
            what = f"micro-batch {mbs}, {'full' if recompute else 'no'} recompute"
            if smallest is None or peak < smallest[0]:
                smallest = (peak, what)
            if peak > cluster.usable_bytes:
                continue
            t = predict_step(cfg, layout, w, cluster, table, mbs, m, recompute)
            if best is None or t.step_s < best.time.step_s:
                best = Choice(layout, mbs, recompute, m, stages, t)
    return (best, None) if best is not None else (None, smallest)


def plan(
    section: ModelSection,
    cluster: ClusterSpec,
    workload: WorkloadSpec,
    table: Optional[ThroughputTable] = None,
    notes: Optional[list[str]] = None,
) -> Plan:
    cluster.validate()
    workload.validate()
    table = table or ThroughputTable()
    cfg = section.resolve()
    cfg.validate()
    out = Plan(section, cluster, workload, table.source, notes=list(notes or []))
    for layout in candidate_layouts(cluster.num_gpus):
        reason = check_layout(cfg, section, layout, workload)
        if reason is not None:
            out.refused.append((layout.label, reason))
            continue
        choice, smallest = best_choice(cfg, section, layout, workload, cluster, table)
        if choice is not None:
            out.ranked.append(choice)
        elif smallest is not None:
            out.too_big.append((layout.label, smallest[0] / GIB, smallest[1]))
    out.ranked.sort(key=lambda c: c.time.step_s)
    if not out.ranked:
        out.notes.append(
            "no layout fits: add GPUs, shorten --seq-length, or use GPUs with more memory"
        )
    return out
