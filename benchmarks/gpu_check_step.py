"""The step section of benchmarks/gpu_check.py: benchmarks/bench_step.py in a child process.

The child gets the section's grant less STARTUP_S as its own `--budget` (it sizes its iteration
counts and skips the parts that no longer fit), writes bench_step_results.json after every part
(a child killed at the timeout still leaves the finished parts, recorded with status "timeout")
and prints its markdown table last. Nothing here imports torch (the driver must survive a broken
installation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from gpu_check_proc import Budget, run_logged

PY = sys.executable
STARTUP_S = 25.0
"""Seconds of the grant kept for the child's imports (torch, TE, Megatron) and teardown."""
RESULTS_NAME = "bench_step_results.json"  # bench_step.RESULTS_NAME (not imported: torch)
BAD = ("error", "failed")


def _table(stdout: Path) -> list[str]:
    """The child's markdown table: its lines from the '## bench_step' header on."""
    try:
        lines = stdout.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("## bench_step")]
    return lines[starts[-1] :] if starts else []


def _status(rc: Optional[int], timed_out: bool, bench: Optional[dict]) -> tuple[str, str]:
    if bench is None:
        return ("timeout" if timed_out else "failed"), f"exit {rc}, no results"
    parts = bench.get("parts", {})
    bad = [n for n, p in parts.items() if p.get("status") in BAD]
    done = f"{sum(p.get('status') == 'ok' for p in parts.values())} of {len(parts)} part(s) ok"
    if timed_out:
        return "timeout", f"killed at the timeout; {done}"
    if rc != 0:
        return "failed", f"exit {rc}; {done}"
    if bad:
        return "failed", f"{done}; not ok: {', '.join(bad)}"
    return "ok", done


def section_step(logs: Path, budget: Budget, timeouts: dict[str, float], dry_run: bool) -> dict:
    """bench_step.py under the section's timeout; its JSON becomes this record's `parts`."""
    grant = budget.grant(timeouts["step"])
    if grant is None:
        return {"status": "skipped", "reason": "out of time budget"}
    out = logs / "step"
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).unlink(missing_ok=True)
    inner = max(5.0, grant - STARTUP_S)
    cmd = [PY, "benchmarks/bench_step.py", "--out", str(out), "--budget", f"{inner:.0f}"]
    if dry_run:
        cmd.append("--dry-run")
    res = run_logged(cmd, out / "bench_step", grant)
    try:
        bench: Optional[dict[str, Any]] = json.loads((out / RESULTS_NAME).read_text())
    except (OSError, ValueError):
        bench = None
    status, reason = _status(res.rc, res.timed_out, bench)
    rec: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "command": " ".join(cmd),
        "exit_code": res.rc,
        "wall_s": round(res.wall_s, 2),
        "results_file": f"logs/step/{RESULTS_NAME}",
        "table": _table(res.stdout),
    }
    if bench is not None:
        rec.update(
            device=bench.get("device"), parts=bench.get("parts"), bench_wall_s=bench.get("wall_s")
        )
    if status != "ok":
        rec.update(error=res.first_error(), error_tail=res.tail())
    return rec


# ----------------------------------------------------------------------------- summary rows
def _n(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _layers(p: dict) -> str:
    return "NaViL/dense " + ", ".join(
        f"{r['flavor'][6:]} {r['visual_share']:.0%}v {_n(r['ratio'], '{:.3f}x')}" for r in p["rows"]
    )


def _fp8(p: dict) -> str:
    out = []
    for k, r in p["rows"].items():
        if k == "bf16":
            out.append(f"bf16 {_n(r.get('ms'), '{:.1f}')} ms")
        else:
            out.append(f"{k} {_n(r.get('speedup'), '{:.2f}x')}" if r.get("ms") else f"{k} skipped")
    return ", ".join(out)


def _vit(p: dict) -> str:
    return ", ".join(
        f"{r['flavor'][6:]} w{r['width']} {_n(r['tflops'], '{:.3g}')} TFLOP/s" for r in p["rows"]
    )


def _step(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('reason', '')}"[:160]
    depth = "x".join(map(str, r["depth"]))
    mfu = _n(r["mfu"] * 100 if r.get("mfu") is not None else None, "{:.1f}%")
    return (
        f"depth {depth}{'' if r['full_depth'] else ' (reduced)'} | {r['ms']:.1f} ms | "
        f"{_n(r['tflops'], '{:.3g}')} TFLOP/s | MFU {mfu} | {_n(r['peak_mem_gib'], '{:.1f}')} GiB"
        f" (DP8 est. {_n(r.get('peak_mem_gib_dp8_estimate'), '{:.1f}')})"
    )


def _switches(p: dict) -> str:
    return ", ".join(
        f"{r['label']} {_n(r.get('speedup'), '{:.3f}x')}"
        if r.get("status") == "ok"
        else f"{r['label']} {r['status']}"
        for r in p["rows"]
    )


def step_rows(s: dict) -> list[tuple[str, str, str, str]]:
    """(name, status, seconds, key numbers) per part of the step section, for the summary."""
    rows = []
    for name, p in s["parts"].items():
        st, t = p.get("status", "?"), _n(p.get("seconds"), "{:.1f}")
        if name == "step" and p.get("rows"):
            for r in p["rows"]:
                rows.append(
                    (
                        f"step:{r['run']}",
                        r.get("status", "?"),
                        _n(r.get("seconds"), "{:.1f}"),
                        _step(r),
                    )
                )
            continue
        if st != "ok":
            keys = p.get("reason", "")[:160]
        elif name == "layers":
            keys = _layers(p)
        elif name == "fp8":
            keys = _fp8(p)
        elif name == "vit":
            keys = _vit(p)
        elif name == "host_syncs":
            keys = (
                f"{p['syncs_per_micro_batch']} syncs, {p['h2d_per_micro_batch']} H2D / micro-batch"
            )
        elif name == "profile":
            keys = "; ".join(f"{e['name'][:40]} {e['share']:.0%}" for e in p["top"][:3])
        else:
            keys = _switches(p)
        rows.append((f"step:{name}", st, t, keys[:200]))
    return rows
