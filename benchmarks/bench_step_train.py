"""Parts 4-7 of the step benchmark (bench_step.py): the full NaViL-2B training step through
the real Trainer, host syncs and the profile of one step, each optimisation switch on and off."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_navil.utils.logging import get_logger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_common import (  # noqa: E402
    TARGETS,
    VISUAL_SHARES,
    Deadline,
    Recorder,
    Sizes,
    attach_pack_meta,
    backend_name,
    guarded,
    make_pack,
    pack_facts,
    peak_gib,
    ratio,
    sync,
    tflops,
    time_call,
)

log = get_logger("bench_step")

# (label, dotted PretrainConfig path, on value, off value, overrides both runs need, needs TE).
# Fields added on other branches are looked up at run time: absent -> "not in this checkout".
SWITCHES: tuple[tuple[str, str, Any, Any, dict, bool], ...] = (
    ("fused SwiGLU", "precision.bias_swiglu_fusion", True, False, {}, False),
    # TE's fused wgrad GEMMs: the local backend refuses it (config/parallel.py)
    ("grad-accum fusion", "precision.gradient_accumulation_fusion", True, False, {}, True),
    ("padding trim", "training.trim_padding", True, False, {}, False),
    (
        "overlap_param_gather",
        "optimizer.overlap_param_gather",
        True,
        False,
        # Megatron needs both for the parameter-gather overlap
        {"optimizer.use_distributed_optimizer": True, "optimizer.overlap_grad_reduce": True},
        False,
    ),
    ("chunked LM head + CE", "precision.lm_head_loss_chunk_rows", 4096, 0, {}, False),
    ("host pack metadata", "data.host_pack_metadata", True, False, {}, False),
)


# ----------------------------------------------------------------------------- full step
class PackStream:
    """The Trainer's loader replaced by fixed realistic packs (cycled), with the interface the
    Trainer reads (state_dict, counters, close); remembers what it served for the FLOP count."""

    def __init__(self, packs: list):
        self.packs, self.position, self.served = packs, 0, []
        self.counters: dict[str, int] = {}

    def __iter__(self):
        return self

    def __next__(self):
        pack = self.packs[self.position % len(self.packs)]
        self.position += 1
        self.served.append(pack)
        return pack

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass


def has_field(obj, dotted: str) -> bool:
    """Whether the config has this dotted field (a dataclass field at every level)."""
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or name not in {
            f.name for f in dataclasses.fields(obj)
        }:
            return False
        obj = getattr(obj, name)
    return True


# The example 2B config's optimizer settings (examples/configs/navil_2b_stage1.yaml).
STEP_OPTIMIZER = {
    "optimizer.use_distributed_optimizer": True,
    "optimizer.overlap_grad_reduce": True,
    "optimizer.overlap_param_gather": True,
}


def step_overrides(sizes: Sizes, preset: str, depth: Optional[tuple[int, int]]) -> dict:
    over = {
        "model.flavor": sizes.flavor("navil-2b"),
        "training.seq_length": sizes.seq_length,
        "training.global_batch_size": sizes.micro_batches,
        "training.train_iters": 1000,
        "stage.preset": preset,
        "precision.params_dtype": "bfloat16" if sizes.gpu else "float32",
        "precision.backend": backend_name(sizes.gpu),
        "logging.progress_bar": "off",
        **STEP_OPTIMIZER,
    }
    if depth is not None:
        over.update({"model.llm.num_layers": depth[0], "model.vision.num_layers": depth[1]})
    return over


def build_trainer(overrides: dict):
    from megatron_navil.config.pretrain import PretrainConfig
    from megatron_navil.training.trainer import Trainer

    cfg = PretrainConfig(mock_data=True).apply_overrides(overrides, parse=False)
    return Trainer(cfg)


def step_packs(trainer, sizes: Sizes) -> list:
    """The micro-batches of one step: half at 30%, half at 60% visual tokens (realistic image
    mix), with host metadata when the config asks for it (and the checkout has it)."""
    meta_on = bool(getattr(trainer.cfg.data, "host_pack_metadata", False))
    packs = []
    for i in range(sizes.micro_batches):
        share = VISUAL_SHARES[i % len(VISUAL_SHARES)]
        b = make_pack(
            trainer.model_cfg,
            sizes.seq_length,
            share,
            sizes.grid_range,
            seed=41 + i,
            fill=sizes.fill,
        )
        packs.append(attach_pack_meta(trainer.model_cfg, b, meta_on))
    return packs


def step_pack_facts(trainer, batch) -> dict[str, Any]:
    """pack_facts plus the tokens the model runs on after the trainer's padding trim."""
    facts = pack_facts(trainer.model_cfg, batch)
    trim = getattr(trainer, "trim_multiple", None)  # training.trim_padding (issue11-switches)
    facts["tokens_run"] = batch.trim_padding(trim).num_tokens if trim else batch.num_tokens
    return facts


def time_steps(trainer, sizes: Sizes, allowance_s: float) -> dict[str, Any]:
    """Warm-up steps, then timed steps: ms, model FLOPs per step (the trainer's convention:
    trained parts, padding out), MFU, peak memory."""
    from megatron_navil.training.flops import micro_batch_count, peak_tflops

    stream = PackStream(step_packs(trainer, sizes))
    trainer.train_loader = stream
    for chunk in trainer.chunks:
        chunk.train()
    records = []
    m_first = 0.0
    for _ in range(sizes.step_warmup):  # the first step also makes the optimizer state
        m_first = time_call(lambda: records.append(trainer.train_step()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    iters = int(allowance_s * 1e3 / max(m_first, 1e-3))
    iters = max(sizes.min_iters, min(sizes.step_max_iters, iters))
    stream.served.clear()
    ms = [time_call(lambda: records.append(trainer.train_step())) for _ in range(iters)]
    flop = sum(
        micro_batch_count(trainer.model_cfg, b, trainer.trained).total for b in stream.served
    )
    step_flop = flop / iters
    peak = peak_tflops(getattr(trainer.cfg.logging, "peak_tflops", None)) or 989.0
    med = statistics.median(ms)
    trained = sum(p.numel() for c in trainer.chunks for p in c.parameters() if p.requires_grad)
    return {
        "ms": med,
        "ms_all": [round(x, 2) for x in ms],
        "iters": iters,
        "tflop_per_step": step_flop / 1e12,
        "tflops": tflops(step_flop, med),
        "mfu": tflops(step_flop, med) / peak,
        "peak_tflops": peak,
        "peak_mem_gib": peak_gib(),
        "trained_params": trained,
        **dp8_estimate(peak_gib(), trained),
        "losses": [r.get("loss") for r in records],
        "packs": [step_pack_facts(trainer, b) for b in stream.packs],
    }


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dp8_estimate(peak: Optional[float], trained: int) -> dict[str, Any]:
    """The peak on one GPU of an 8-GPU node (the example config's layout), estimated: there the
    distributed optimizer keeps 1/8 of its fp32 master weights and Adam moments (12 bytes per
    trained parameter) on each GPU; everything else (bf16 weights, fp32 grad buffer,
    activations) is per GPU already. On one GPU nothing is sharded."""
    state = 12 * trained / 2**30
    if peak is None:
        return {"optimizer_state_gib": state}
    return {"optimizer_state_gib": state, "peak_mem_gib_dp8_estimate": peak - state * 7 / 8}


def release(trainer) -> Optional[float]:
    """Free the trainer's GPU memory before the next one is built; GiB still allocated after
    (recorded: memory a freed trainer leaves behind would shrink the next run's room)."""
    trainer.chunks = trainer.optimizer = trainer.scheduler = None
    del trainer
    free_memory()
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def step_runs(sizes: Sizes) -> list[tuple[str, str, Optional[str]]]:
    """(label, stage preset, recompute granularity). The docs name no recompute policy for one
    GPU: stage 1 runs without; full training without and with full (uniform, 1 layer) recompute,
    the one that keeps activations to a layer input each (docs/scaling.md)."""
    return [("stage1", "stage1", None), ("full", "full", None), ("full+recompute", "full", "full")]


def extrapolate(
    row: dict, depth: tuple[int, int], full: tuple[int, int], per_layer
) -> Optional[float]:
    """Full-depth step ms from a reduced-depth one plus per-layer ms of parts 1 and 3 (an
    estimate: it assumes every layer costs what the isolated layer cost)."""
    llm_ms, vit_ms = per_layer
    if llm_ms is None or vit_ms is None:
        return None
    micro = row["micro_batches"]
    return row["ms"] + micro * ((full[0] - depth[0]) * llm_ms + (full[1] - depth[1]) * vit_ms)


def step_row(label: str, sizes: Sizes, depth, full_depth, recompute, fits: bool) -> dict:
    row: dict[str, Any] = {
        "run": label,
        "model": sizes.flavor("navil-2b"),
        "depth": list(depth or full_depth),
        "full_depth": depth is None,
        "micro_batches": sizes.micro_batches,
        "recompute": recompute,
    }
    if depth is not None:
        row["note"] = (
            "reduced depth: full depth did not fit the time left"
            if not fits
            else "reduced depth (dry run: exercises the fallback)"
        )
    return row


def step_extras(trainer, label: str, rec: "Recorder") -> None:
    """Profile and host syncs on the first step run that trained (the real full-depth model
    when it fits), so those parts need no model of their own."""
    for name, fn in (
        ("profile", profile_step),
        ("host_syncs", lambda t: count_host_syncs(t, t.train_loader.packs[0])),
    ):
        if name not in rec.selected or name in rec.results["parts"]:
            continue
        t0 = time.monotonic()
        out = guarded(lambda: fn(trainer))
        out.update(run=label, depth=rec.results["parts"]["step"]["rows"][-1]["depth"])
        out["seconds"] = round(time.monotonic() - t0, 2)
        rec.put(name, out)


def part_step(sizes: Sizes, deadline: Deadline, rec: "Recorder") -> dict[str, Any]:
    """4. The full NaViL-2B step (stage 1, full training) through the Trainer; on the first
    run that trains, also 5. host syncs and 6. the profile."""
    from megatron_navil.config.flavors import get_flavor

    full_cfg = get_flavor(sizes.flavor("navil-2b"))
    full_depth = (full_cfg.llm.num_layers, full_cfg.vision.num_layers)
    runs = step_runs(sizes)
    out: dict[str, Any] = {
        "status": "running",
        "rows": [],
        "target_mfu": TARGETS["step_mfu"],
        "full_depth": list(full_depth),
    }
    for i, (label, preset, recompute) in enumerate(runs):
        t0 = time.monotonic()
        fits = deadline.left() >= sizes.step_full_depth_s
        depth = None if fits and label not in sizes.reduced_runs else sizes.reduced_depth
        over = step_overrides(sizes, preset, depth)
        if recompute:
            over["parallel.recompute_granularity"] = recompute
        row = step_row(label, sizes, depth, full_depth, recompute, fits)
        out["rows"].append(row)
        try:
            trainer = build_trainer(over)
        except Exception as e:  # e.g. out of memory at full depth: recorded, the next run goes on
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            trainer = None
        if trainer is None:
            free_memory()  # here, not in the except clause: its traceback holds the tensors
            rec.put("step", out)
            continue
        try:
            row.update(time_steps(trainer, sizes, deadline.left() / (len(runs) - i) * 0.3))
            row["status"] = "ok"
            rec.put("step", out)
            step_extras(trainer, label, rec)
        except Exception as e:
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
        finally:
            row["gib_left_after_release"] = release(trainer)
        row["seconds"] = round(time.monotonic() - t0, 2)
        if depth is not None and row.get("ms"):
            est = extrapolate(row, depth, full_depth, per_layer_ms(rec.results))
            row["ms_full_depth_estimate"] = est
        rec.put("step", out)  # a kill during the next run keeps this one
    out["status"] = "ok" if any(r.get("status") == "ok" for r in out["rows"]) else "failed"
    return out


def per_layer_ms(results: dict) -> tuple[Optional[float], Optional[float]]:
    """navil-2b's decoder layer (mean over the visual shares) and ViT layer ms from parts 1, 3."""
    parts = results["parts"]
    llm = [
        r["navil_ms"] for r in parts.get("layers", {}).get("rows", []) if r["flavor"] == "navil-2b"
    ]
    vit = [
        r["ms_per_layer"] for r in parts.get("vit", {}).get("rows", []) if r["flavor"] == "navil-2b"
    ]
    return (statistics.mean(llm) if llm else None, statistics.mean(vit) if vit else None)


# ----------------------------------------------------------------------------- syncs, profile
def count_host_syncs(trainer, batch) -> dict[str, Any]:
    """Calls that would block the host, for one micro-batch of the training step (forward_step,
    loss, backward), as benchmarks/host_syncs.py counts them on issue11-hostsync."""
    try:
        from megatron_navil.utils.host_syncs import HostSyncCounter
    except ImportError:
        return {"status": "skipped", "reason": "not available (megatron_navil.utils.host_syncs)"}
    from megatron_navil.training.step import forward_step

    def count(b):
        model = trainer.chunks[0]
        # torch.compile'd kernels (Megatron's fused SwiGLU) run eagerly while counted: a
        # function mode around a compiled function would make dynamo recompile it
        with eager(), HostSyncCounter() as c:
            output, loss_fn = forward_step(iter([b]), model)
            loss_sum, num_tokens, _ = loss_fn(output)
            (loss_sum / num_tokens).backward()
        model.zero_grad_buffer()
        return c

    c = count(batch)
    rec = {
        "status": "ok",
        "syncs_per_micro_batch": len(c.syncs),
        "h2d_per_micro_batch": len(c.h2d),
        "top_sites": dict(list(c.by_site().items())[:10]),
    }
    if getattr(batch, "pack_meta", None) is not None:  # the same pack, metadata on the device
        off = count(dataclasses.replace(batch, pack_meta=None))
        rec.update(syncs_without_pack_meta=len(off.syncs), h2d_without_pack_meta=len(off.h2d))
    return rec


def eager():
    """torch.compile'd functions run eagerly inside (a null context on an older torch)."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def profile_step(trainer) -> dict[str, Any]:
    """One training step under torch.profiler: the 15 kernels with the most device time (ops
    with the most self CPU time without a GPU), with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        trainer.train_step()
        sync()
    events = list(prof.key_averages())
    gpu = torch.cuda.is_available()
    if gpu:
        # Kernel rows only: an operator's row also carries the device time of the kernels it
        # launched, which would count each kernel twice in the total.
        from torch.autograd import DeviceType

        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        events = kernels or events

    def self_us(e) -> float:
        if gpu:
            return float(
                getattr(e, "self_device_time_total", None)
                or getattr(e, "self_cuda_time_total", 0.0)
            )
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:15]
    return {
        "status": "ok",
        "clock": "CUDA self time" if gpu else "CPU self time",
        "total_ms": total / 1e3,
        "top": [
            {
                "name": e.key[:120],
                "ms": self_us(e) / 1e3,
                "share": self_us(e) / total,
                "calls": e.count,
            }
            for e in top
        ],
    }


def part_syncs_and_profile(sizes: Sizes, deadline: Deadline, which: str) -> dict[str, Any]:
    """5./6. Host syncs or the profile on a reduced-depth 2B trainer (full training), when the
    step part made neither (it did not run, or no run of it trained)."""
    trainer = build_trainer(step_overrides(sizes, "full", sizes.reduced_depth))
    try:
        packs = step_packs(trainer, sizes)
        trainer.train_loader = PackStream(packs)
        for chunk in trainer.chunks:
            chunk.train()
        trainer.train_step()  # warm-up: kernels chosen, optimizer state made
        out = (
            count_host_syncs(trainer, packs[0]) if which == "host_syncs" else profile_step(trainer)
        )
    finally:
        release(trainer)
    out["depth"] = list(sizes.reduced_depth)
    return out


# ----------------------------------------------------------------------------- switches
def switch_plan(table=SWITCHES) -> list[dict[str, Any]]:
    """Each switch with whether its config field (and the fields it needs) exist here."""
    from megatron_navil.config.pretrain import PretrainConfig

    base = PretrainConfig(mock_data=True)
    plan = []
    for label, path, on, off, needs, needs_te in table:
        missing = [p for p in (path, *needs) if not has_field(base, p)]
        why = "not in this checkout: " + ", ".join(missing) if missing else None
        if why is None and needs_te and backend_name(torch.cuda.is_available()) == "local":
            why = "needs the transformer_engine backend (the local backend refuses it)"
        plan.append(
            {
                "label": label,
                "path": path,
                "on": on,
                "off": off,
                "needs": needs,
                "present": why is None,
                **({"reason": why} if why else {}),
            }
        )
    return plan


def switch_row(sw: dict, sizes: Sizes, allowance_s: float) -> dict[str, Any]:
    """Step ms with the switch on and off (everything else as the step's defaults)."""
    row = {k: sw[k] for k in ("label", "path", "on", "off")}
    for side in ("on", "off"):
        over = step_overrides(sizes, "full", sizes.reduced_depth)
        over.update(sw["needs"])
        over[sw["path"]] = sw[side]
        try:
            trainer = build_trainer(over)
        except Exception as e:  # e.g. a switch the local backend refuses (ConfigError)
            row[f"{side}_error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        try:
            row[f"{side}_ms"] = time_steps(trainer, sizes, allowance_s / 2)["ms"]
        except Exception as e:
            row[f"{side}_error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            release(trainer)
    row["speedup"] = ratio(row.get("off_ms"), row.get("on_ms"))  # > 1: the switch helps
    row["status"] = "ok" if row["speedup"] is not None else "error"
    return row


def part_switches(sizes: Sizes, deadline: Deadline, rec: "Recorder") -> dict[str, Any]:
    """7. Each switch on/off for the step at reduced depth (saved after every switch)."""
    plan = switch_plan()
    out: dict[str, Any] = {"status": "running", "depth": list(sizes.reduced_depth), "rows": []}
    todo = sum(s["present"] for s in plan)
    for sw in plan:
        head = {"label": sw["label"], "path": sw["path"]}
        if not sw["present"]:
            row = {**head, "status": "skipped", "reason": sw["reason"]}
        elif deadline.left() < SWITCH_MIN_S * (1 if sizes.gpu else 0.01):
            row = {**head, "status": "skipped", "reason": "out of time budget"}
        else:
            row = switch_row(sw, sizes, deadline.left() / todo * 0.3)
            todo -= 1
        out["rows"].append(row)
        rec.put("switches", out)
    out["status"] = "ok"
    return out


SWITCH_MIN_S = 12.0
"""Seconds one switch needs on a GPU: two reduced-depth trainers and their steps."""
