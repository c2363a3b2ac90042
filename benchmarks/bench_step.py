"""Step benchmark of issue 11: NaViL layers vs dense, FP8, the ViT, a full NaViL-2B step.

    PYTHONPATH=/tmp/site:. python benchmarks/bench_step.py --out $OUT        # GPU machine
    PYTHONPATH=. python benchmarks/bench_step.py --dry-run --out /tmp/bs      # CPU: the logic

Run by the `step` section of benchmarks/gpu_check.py (docs/gpu.md). In one process, within
`--budget` seconds (parts that no longer fit are recorded as skipped, with the reason), it
measures with warm-up then timed iterations (CUDA events on a GPU, time.perf_counter on CPU):
1. layers: our NaViL decoder layer (MHA-MMoE + FFN-MMoE, built through models/specs.py) beside
   Megatron-Core's dense GPT layer of the same activated shape (TE spec on a GPU, the local
   spec with our THD core attention on CPU), packed THD, navil-2b and navil-9b shapes, 30% and
   60% visual tokens: ms fwd+bwd, TFLOP/s (training/flops.py counts) and NaViL/dense.
2. fp8: a NaViL-9B layer stack in bf16 and in every FP8 recipe precision.fp8 offers that this
   device supports (models/fp8.py): ms and bf16/FP8 speed-up.
3. vit: the 2B/9B vision encoders (a few blocks) on images of 32x48 to 64x64 patches, per-image
   THD attention: TFLOP/s.
4. step: the full NaViL-2B training step through the real Trainer (ViT + connector + LLM + loss,
   Megatron DDP + distributed optimizer) on realistic packs (several images plus text samples,
   30%/60% visual tokens), stage 1 and full training: step ms, MFU (flops.py convention, vision
   counted), peak memory. At reduced depth when full depth does not fit the time left (labelled,
   with a per-layer extrapolation from parts 1 and 3).
5. host_syncs: calls that block the host per micro-batch (megatron_navil/utils/host_syncs.py,
   "not available" in a checkout without it).
6. profile: the top 15 kernels (CUDA time; CPU time in a dry run) of one profiled step.
7. switches: each optimisation switch of SWITCHES on and off for the step (reduced depth);
   a switch whose config field is not in this checkout is recorded as such.
The dry run (`--dry-run`) runs every part on CPU with the debug flavors standing in for
navil-2b/9b (same backbone layouts, tiny widths), fp32, the local backend; FP8 is recorded as
skipped there. Results: <out>/bench_step_results.json (rewritten after each part), a markdown
table printed last. The GPU result belongs in benchmarks/bench_step_results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_navil.utils.logging import get_logger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_common import (  # noqa: E402
    DRY_SIZES,
    GPU_SIZES,
    TARGETS,
    Deadline,
    Recorder,
    Sizes,
    device_facts,
    guarded,
)
from bench_step_layers import part_fp8, part_layers, part_vit  # noqa: E402
from bench_step_train import part_step, part_switches, part_syncs_and_profile  # noqa: E402

log = get_logger("bench_step")

RESULTS_NAME = "bench_step_results.json"
PARTS = ("layers", "vit", "fp8", "step", "host_syncs", "profile", "switches")


# ----------------------------------------------------------------------------- driver
# Seconds each part needs at least on a GPU (a part with less left is skipped), and the seconds
# it is planned to take: a part gets the time left in proportion to its plan among the parts
# still to run (its iteration counts are sized from that). The step's three full-depth runs
# (build ~20 s, 5-8 steps) are the largest item.
MIN_S = {
    "layers": 25,
    "vit": 10,
    "fp8": 20,
    "step": 40,
    "profile": 15,
    "host_syncs": 15,
    "switches": 20,
}
PLAN_S = {
    "layers": 25,
    "vit": 12,
    "fp8": 25,
    "step": 100,
    "profile": 10,
    "host_syncs": 10,
    "switches": 50,
}


def run_part(name: str, sizes: Sizes, deadline: Deadline, rec: Recorder) -> dict[str, Any]:
    """One part under its planned share of the time left."""
    done = rec.results["parts"].get(name)
    if done is not None:  # profile / host syncs made by the step part
        return done
    if deadline.left() < (MIN_S[name] if sizes.gpu else 0.0):
        return {"status": "skipped", "reason": f"out of time budget ({deadline.left():.0f} s left)"}
    todo = [n for n in PARTS if n in rec.selected and n not in rec.results["parts"]]
    share = Deadline(deadline.left() * PLAN_S[name] / sum(PLAN_S[n] for n in todo))
    t0 = time.monotonic()
    runners: dict[str, Callable[[], dict]] = {
        "layers": lambda: part_layers(sizes, share),
        "vit": lambda: part_vit(sizes, share),
        "fp8": lambda: part_fp8(sizes, share),
        "step": lambda: part_step(sizes, share, rec),
        "switches": lambda: part_switches(sizes, share, rec),
        "profile": lambda: part_syncs_and_profile(sizes, share, "profile"),
        "host_syncs": lambda: part_syncs_and_profile(sizes, share, "host_syncs"),
    }
    out = guarded(runners[name])
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_all(sizes: Sizes, budget_s: float, parts: list[str], out: Path) -> dict:
    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.training.flops import CONVENTION
    from megatron_navil.utils.distributed import destroy, initialize_model_parallel

    deadline = Deadline(budget_s)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "dry_run": not sizes.gpu,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget_s": budget_s,
        "device": device_facts(),
        "sizes": dataclasses.asdict(sizes),
        "convention": CONVENTION,
        "targets": TARGETS,
        "parts": {},
    }
    rec = Recorder(results, out / RESULTS_NAME, parts)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # a process group of its own: never the MASTER_PORT it inherited (a parent holding a
        # store there, e.g. the test session, makes the bind fail with EADDRINUSE)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        for name in PARTS:
            if name not in parts:
                rec.put(name, {"status": "skipped", "reason": "not selected (--parts)"})
                continue
            log.info("part %s (%.0f s left)", name, deadline.left())
            initialize_model_parallel(ParallelConfig(), seed=1234)  # a Trainer may have changed it
            record = run_part(name, sizes, deadline, rec)
            results["wall_s"] = round(time.monotonic() - t0, 2)
            rec.put(name, record)
            log.info("part %s: %s", name, record["status"])
    finally:
        destroy()
    results["wall_s"] = round(time.monotonic() - t0, 2)
    rec.save()
    return results


# ----------------------------------------------------------------------------- table
def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_lines(results: dict) -> list[str]:
    """The markdown table: one row per measurement, 'skipped'/'error' rows with the reason."""
    p = results["parts"]
    lines = ["| part | what | ms | TFLOP/s | ratio / MFU | note |", "|---|---|---|---|---|---|"]

    def add(part, what, ms="-", tf="-", r="-", note=""):
        cells = [str(c).replace("|", "/") for c in (part, what, ms, tf, r, note)]  # kernel names
        lines.append("| " + " | ".join(cells) + " |")

    def skipped(name):
        rec = p.get(name, {})
        if rec.get("status") in ("skipped", "error", "failed") and "rows" not in rec:
            add(name, rec.get("status", "?"), note=rec.get("reason", ""))
            return True
        return False

    if not skipped("layers"):
        for r in p["layers"]["rows"]:
            what = f"{r['flavor']} layer {r['visual_share']:.0%} visual (NaViL / dense)"
            add(
                "layers",
                what,
                f"{r['navil_ms']:.3f} / {r['dense_ms']:.3f}",
                f"{_f(r['navil_tflops'], '{:.3g}')} / {_f(r['dense_tflops'], '{:.3g}')}",
                _f(r["ratio"], "{:.3f}x"),
                f"target >= {TARGETS['layer_ratio']}",
            )
    if not skipped("fp8"):
        for k, r in p["fp8"]["rows"].items():
            if r.get("status") != "ok":
                add("fp8", k, note=f"skipped: {r.get('reason', '')}")
            else:
                add(
                    "fp8",
                    f"9B x{p['fp8']['layers']} layers {k}",
                    _f(r["ms"], "{:.2f}"),
                    _f(r["tflops"], "{:.3g}"),
                    _f(r.get("speedup"), "{:.2f}x"),
                    "" if k == "bf16" else f"target >= {TARGETS['fp8_speedup']}",
                )
    if not skipped("vit"):
        for r in p["vit"]["rows"]:
            add(
                "vit",
                f"{r['flavor']} ViT width {r['width']}, {r['images']} images",
                _f(r["ms"], "{:.2f}"),
                _f(r["tflops"], "{:.3g}"),
                "-",
                f"target >= {TARGETS['vit_tflops']:.0f} at width >= 1536",
            )
    if not skipped("step"):
        for r in p["step"]["rows"]:
            depth = "x".join(map(str, r["depth"]))
            if r.get("status") != "ok":
                add(
                    "step",
                    f"{r['run']} depth {depth}",
                    note=f"{r.get('status')}: {r.get('reason', '')}",
                )
                continue
            note = f"peak {_f(r['peak_mem_gib'])} GiB"
            if r.get("peak_mem_gib_dp8_estimate") is not None:
                note += f" (8-GPU node est. {r['peak_mem_gib_dp8_estimate']:.1f})"
            if r.get("ms_full_depth_estimate"):
                note += f"; {r['note']}; full depth est. {r['ms_full_depth_estimate']:.0f} ms"
            add(
                "step",
                f"{r['run']} depth {depth} (LLM x ViT)",
                _f(r["ms"]),
                _f(r["tflops"], "{:.3g}"),
                _f(r["mfu"] * 100, "MFU {:.1f}%"),
                note,
            )
    for name in ("host_syncs", "profile"):
        rec = p.get(name, {})
        if rec.get("status") != "ok":
            add(name, rec.get("status", "?"), note=rec.get("reason", ""))
        elif name == "host_syncs":
            add(
                name,
                "per micro-batch",
                note=f"{rec['syncs_per_micro_batch']} syncs, "
                f"{rec['h2d_per_micro_batch']} pageable H2D"
                + (
                    f" (without pack metadata: {rec['syncs_without_pack_meta']} syncs, "
                    f"{rec['h2d_without_pack_meta']} H2D)"
                    if "syncs_without_pack_meta" in rec
                    else ""
                ),
            )
        else:
            for e in rec["top"][:15]:
                add(
                    name,
                    e["name"][:60],
                    _f(e["ms"], "{:.2f}"),
                    "-",
                    _f(e["share"] * 100, "{:.1f}%"),
                    rec["clock"],
                )
    if not skipped("switches"):
        for r in p["switches"]["rows"]:
            if r.get("status") != "ok":
                add(
                    "switches",
                    r["label"],
                    note=f"{r['status']}: {switch_reason(r)}"[:160],
                )
            else:
                add(
                    "switches",
                    f"{r['label']} on / off",
                    f"{r['on_ms']:.1f} / {r['off_ms']:.1f}",
                    "-",
                    _f(r["speedup"], "{:.3f}x"),
                    r["path"],
                )
    return lines


def switch_reason(row: dict) -> str:
    return row.get("reason") or row.get("on_error") or row.get("off_error") or ""


def format_table(results: dict) -> str:
    d = results["device"]
    head = (
        f"## bench_step ({'dry run, CPU' if results['dry_run'] else d['device']}; "
        f"torch {d['torch']}, mcore {d.get('megatron.core')}, TE {d.get('transformer_engine')}; "
        f"{results.get('wall_s', 0):.0f} s)"
    )
    return "\n".join([head, "", *table_lines(results)])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, debug flavors, fp32, local backend")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    p.add_argument("--budget", type=float, default=220.0, help="seconds for everything")
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS)
    )
    a = p.parse_args(argv)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}")
    gpu = torch.cuda.is_available() and not a.dry_run
    if not gpu and not a.dry_run:
        log.warning("no CUDA device: running the dry run")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(GPU_SIZES if gpu else DRY_SIZES, a.budget, parts, out)
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
