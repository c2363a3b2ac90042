"""One prepared GPU check: environment, step benchmark, GPU tests, short training runs, decode.

    bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget S] [--timeout NAME=S ...]
                                 [--sections env,step,gpu_tests,training,decode]

Made to run ONCE on the GPU test machine right after staging (docs/gpu.md), in under 8 minutes on
one H200, and on CPU as `--dry-run` (CI: tests/test_gpu_check.py). Sections, each in child
processes with its own timeout; one that fails or times out is recorded as such and the check
moves on:
1. env: python/torch/CUDA versions, device name + compute capability, `nvidia-smi`, and imports
   of megatron.core, transformer_engine.pytorch, nvidia.dali (version or the import error).
2. step: benchmarks/bench_step.py (issue 11; benchmarks/gpu_check_step.py): NaViL layer vs the
   dense Megatron TE layer, FP8 vs bf16, ViT TFLOP/s, the full NaViL-2B step (MFU, peak
   memory), host syncs, top kernels, each optimisation switch on/off. Runs second so that its
   measurements get their time; the sections after it share what is left of the budget.
3. gpu_tests: `python -m pytest -q -m gpu tests/gpu tests/data/test_gpu.py --junitxml ...`:
   passed/failed/skipped counts, skip reasons, failing tests' names and first lines.
4. training: synthetic captions -> tokenizer -> shards (as examples/quickstart.sh), then short
   runs of `python -m megatron_navil.cli.pretrain` under torchrun: debug model bf16 and FP8
   delayed; navil-2b widths at 2+2 layers bf16 and FP8 delayed (FP8 tensorwise: gpu_tests)
   (benchmarks/gpu_check_train.py). Per run: exit code, first/last loss, finite, falling (mean
   of the last 5 < mean of the first 5), tokens/s, TFLOP/s per GPU, MFU, peak memory, wall time.
5. decode: benchmarks/bench_loader.py, DALI (`mixed` on GPU) beside a PIL DataLoader on the
   same JPEGs: img/s of both and the ratio, single- and multi-scale.
`--dry-run`: the same driver on CPU: local backend, fp32, the debug run only (12 steps; FP8 and
navil-2b runs recorded as "skipped: dry run"), DALI CPU decode of 8 images, the same pytest call
(the GPU tests skip: their counts are recorded), bench_step's dry run (debug flavors, no FP8).

Outputs under --out DIR, else $OUT (the device tool's folder), else ./gpu_check_out, three files
only (the device tool brings back at most 8): results.json (every section; rewritten after each
section, so a killed check still leaves what it finished), logs.tar.gz (`logs/<section>/...`:
*.stdout.log / *.stderr.log of every child, junit.xml, the metrics JSONL of every run,
bench_loader_results.json, bench_step_results.json; results.json names these members),
summary.txt (the table).
Progress lines go to stdout as sections start; the summary table is printed LAST. The process
always exits 0.

Timeouts (seconds) per step: env, step, gpu_tests, data (all of the data preparation), train_debug
and train_2b (per run), decode; `--timeout NAME=S` or GPU_CHECK_TIMEOUTS="NAME=S,NAME=S".
`--budget S` (or GPU_CHECK_BUDGET) caps the whole check: each step gets min(its timeout, what is
left), and steps with no time left are recorded as skipped ("out of time budget").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_proc import REPO, Budget, run_logged  # noqa: E402
from gpu_check_step import section_step, step_rows  # noqa: E402
from gpu_check_train import run_training  # noqa: E402

PY = sys.executable
# step runs right after env: issue 11's measurements get their time before the correctness
# sections, which then share what is left of the budget (docs/gpu.md).
SECTIONS = ("env", "step", "gpu_tests", "training", "decode")
TIMEOUTS: dict[str, float] = {
    "env": 90,
    "step": 240,
    "gpu_tests": 210,
    "data": 60,
    "train_debug": 90,
    "train_2b": 120,
    "decode": 100,
}
BUDGET_S = 450.0  # 7.5 min: the check must end within 8 minutes on the H200
GPU_TESTS = ("tests/gpu", "tests/data/test_gpu.py")
TABLE_HEADER = "== gpu_check summary"
LOGS_ARCHIVE = "logs.tar.gz"
MAX_LOG_BYTES = 2 * 2**20

ENV_PROBE = r"""
import importlib, json, sys, time
def put(key, value):
    print(json.dumps({key: value}), flush=True)
put("python", sys.version.split()[0])
try:
    import torch
    put("torch", torch.__version__)
    put("torch_cuda", torch.version.cuda)
    put("cuda_available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        put("device", torch.cuda.get_device_name(0))
        put("capability", "%d.%d" % torch.cuda.get_device_capability(0))
        put("device_count", torch.cuda.device_count())
        put("memory_gib", round(p.total_memory / 2**30, 1))
        put("cudnn", torch.backends.cudnn.version())
except Exception as e:
    put("torch_error", f"{type(e).__name__}: {e}"[:400])
for mod in ("megatron.core", "transformer_engine.pytorch", "nvidia.dali"):
    t = time.perf_counter()
    try:
        m = importlib.import_module(mod)
        top = importlib.import_module(mod.rsplit(".", 1)[0]) if "." in mod else m
        v = getattr(m, "__version__", None) or getattr(top, "__version__", None)
        put(mod, {"ok": True, "version": v, "import_s": round(time.perf_counter() - t, 2)})
    except BaseException as e:
        put(mod, {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
try:
    from megatron_navil.models.backends import te_available
    put("navil_te_available", te_available())
except BaseException as e:
    put("navil_te_available", f"{type(e).__name__}: {e}"[:400])
"""
IMPORTS = ("megatron.core", "transformer_engine.pytorch", "nvidia.dali")


# ----------------------------------------------------------------------------- helpers
def parse_timeouts(items: list[str], env_value: str) -> dict[str, float]:
    """Defaults, then GPU_CHECK_TIMEOUTS, then --timeout flags; unknown names are an error."""
    out = dict(TIMEOUTS)
    for item in [s for s in env_value.split(",") if s.strip()] + items:
        name, _, value = item.partition("=")
        if name.strip() not in out or not value:
            raise SystemExit(f"gpu_check: bad timeout {item!r}; names: {', '.join(TIMEOUTS)}")
        out[name.strip()] = float(value)
    return out


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a section; a bug in the driver becomes an 'error' record, never a crash."""
    t0 = time.monotonic()
    try:
        rec = fn()
    except Exception as e:  # the check must always finish and report
        rec = {
            "status": "error",
            "reason": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc().splitlines()[-8:],
        }
    rec.setdefault("seconds", round(time.monotonic() - t0, 2))
    return rec


def _timed_out(res, what: str) -> dict[str, Any]:
    return {
        "status": "timeout",
        "reason": f"{what} timed out after {res.wall_s:.1f} s",
        "error": res.first_error(),
        "error_tail": res.tail(),
    }


# ----------------------------------------------------------------------------- sections
def section_env(logs: Path, budget: Budget, timeouts: dict[str, float], dry_run: bool) -> dict:
    """Versions, device, and the three imports the GPU path needs."""
    grant = budget.grant(timeouts["env"])
    if grant is None:
        return skipped("out of time budget")
    probe = logs / "env" / "env_probe.py"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(ENV_PROBE)
    res = run_logged([PY, str(probe)], logs / "env" / "probe", grant)
    info: dict[str, Any] = {}
    for line in res.stdout.read_text(errors="replace").splitlines():
        try:
            info.update(json.loads(line))
        except ValueError:
            continue
    rec: dict[str, Any] = {
        "info": info,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "nvte_framework": os.environ.get("NVTE_FRAMEWORK"),
    }
    if shutil.which("nvidia-smi") and budget.grant(15):
        smi = run_logged(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            logs / "env" / "nvidia_smi",
            15,
        )
        rec["nvidia_smi"] = smi.tail(4, "stdout")
    if res.timed_out:
        return {**rec, **_timed_out(res, "env probe")}
    missing = [m for m in IMPORTS if not (info.get(m) or {}).get("ok")]
    if res.rc != 0 or "torch" not in info:
        rec.update(status="failed", reason=f"probe exit {res.rc}", error_tail=res.tail())
    elif dry_run:  # CPU: TE is expected to be missing; the probe itself is what is checked
        rec.update(status="ok", reason="dry run; missing: " + (", ".join(missing) or "none"))
    elif not info.get("cuda_available") or missing:
        rec.update(
            status="failed",
            reason="; ".join(
                (["no CUDA device"] if not info.get("cuda_available") else [])
                + [f"cannot import {m}" for m in missing]
            ),
        )
    else:
        rec["status"] = "ok"
    return rec


def parse_junit(path: Path) -> dict[str, Any]:
    """passed/failed/errors/skipped counts, skip reasons, failures' names and first lines."""
    counts = Counter({"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
    failures: list[dict[str, str]] = []
    reasons: Counter = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            tag = "failure" if "failure" in kids else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            el = kids[tag]
            text = (el.get("message") or el.text or "").strip()
            failures.append(
                {
                    "name": name,
                    "kind": tag,
                    "first_line": text.splitlines()[0][:300] if text else "",
                }
            )
        elif "skipped" in kids:
            counts["skipped"] += 1
            reasons[(kids["skipped"].get("message") or "").strip()[:200]] += 1
        else:
            counts["passed"] += 1
    return {**counts, "skip_reasons": dict(reasons), "failures": failures}


def section_gpu_tests(
    logs: Path, budget: Budget, timeouts: dict[str, float], dry_run: bool
) -> dict:
    """The marked GPU tests through pytest, counted from its JUnit XML."""
    grant = budget.grant(timeouts["gpu_tests"])
    if grant is None:
        return skipped("out of time budget")
    junit = logs / "gpu_tests" / "junit.xml"
    junit.unlink(missing_ok=True)
    paths = [p for p in GPU_TESTS if (REPO / p).exists()]
    if not paths:
        return {"status": "failed", "reason": f"none of {', '.join(GPU_TESTS)} exists"}
    cmd = [
        PY,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *paths,
    ]
    res = run_logged(cmd, logs / "gpu_tests" / "pytest", grant)
    rec: dict[str, Any] = {
        "command": " ".join(cmd),
        "exit_code": res.rc,
        "wall_s": round(res.wall_s, 2),
        "paths": paths,
    }
    if junit.exists():
        try:
            rec.update(parse_junit(junit))
        except ET.ParseError as e:
            rec["junit_error"] = str(e)
    if res.timed_out:
        return {**rec, **_timed_out(res, "pytest")}
    if res.rc == 0 and not dry_run and rec.get("passed", 0) == 0:
        rec.update(
            status="failed",
            reason=f"all {rec.get('skipped', 0)} test(s) skipped on a GPU run (see skip_reasons)",
        )
    elif res.rc == 0:
        rec["status"] = "ok"
    else:
        rec.update(
            status="failed", reason=f"pytest exit {res.rc}", pytest_tail=res.tail(15, "stdout")
        )
    return rec


def section_training(logs: Path, budget: Budget, timeouts: dict[str, float], dry_run: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu_check_data_"))  # scratch data: not sent back
    try:
        return run_training(logs, work, budget, timeouts, dry_run, note)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def section_decode(logs: Path, budget: Budget, timeouts: dict[str, float], dry_run: bool) -> dict:
    """benchmarks/bench_loader.py: DALI decode stage vs PIL DataLoader on the same images."""
    grant = budget.grant(timeouts["decode"])
    if grant is None:
        return skipped("out of time budget")
    results = logs / "decode" / "bench_loader_results.json"
    results.unlink(missing_ok=True)
    device = "cpu" if dry_run else "gpu"
    size = (
        [
            "--num-images",
            "8",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--dali-threads",
            "2",
            "--pil-workers",
            "2",
        ]
        if dry_run
        else [
            "--num-images",
            "192",
            "--batch",
            "32",
            "--repeats",
            "2",
            "--dali-threads",
            "8",
            "--pil-workers",
            "16",
        ]
    )
    cmd = [PY, "benchmarks/bench_loader.py", "--device", device, *size, "--results", str(results)]
    res = run_logged(cmd, logs / "decode" / "bench_loader", grant)
    rec: dict[str, Any] = {
        "command": " ".join(cmd),
        "exit_code": res.rc,
        "wall_s": round(res.wall_s, 2),
        "device": device,
    }
    if res.timed_out:
        return {**rec, **_timed_out(res, "bench_loader")}
    try:
        entry = json.loads(results.read_text())[device]
    except (OSError, ValueError, KeyError):
        return {
            **rec,
            "status": "failed",
            "reason": f"exit {res.rc}, no results",
            "error": res.first_error(),
            "error_tail": res.tail(),
        }
    rows = {
        r["mode"]: {"dali_img_s": r["dali_img_s"], "pil_img_s": r["pil_img_s"], "ratio": r["ratio"]}
        for r in entry["rows"]
    }
    rec.update(
        rows=rows,
        images=entry.get("images"),
        hardware=entry.get("hardware"),
        mean_megapixels=entry.get("mean_megapixels"),
    )
    good = (
        res.rc == 0
        and rows
        and all(r["dali_img_s"] > 0 and r["pil_img_s"] > 0 for r in rows.values())
    )
    if good:
        rec["status"] = "ok"
    else:
        rec.update(status="failed", reason=f"exit {res.rc} or zero img/s")
    return rec


RUNNERS = {
    "env": section_env,
    "step": section_step,
    "gpu_tests": section_gpu_tests,
    "training": section_training,
    "decode": section_decode,
}


# ----------------------------------------------------------------------------- summary
def _num(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _env_keys(s: dict) -> str:
    i = s.get("info", {})
    mods = []
    for m, short in zip(IMPORTS, ("mcore", "TE", "DALI")):
        r = i.get(m) or {}
        mods.append(f"{short} {r.get('version') or '?'}" if r.get("ok") else f"{short} missing")
    dev = f"{i['device']} sm{i.get('capability', '?')}" if i.get("device") else "no GPU"
    return f"torch {i.get('torch', '?')} cuda {i.get('torch_cuda') or '-'} | {dev} | " + ", ".join(
        mods
    )


def _run_keys(r: dict) -> str:
    if r.get("status") == "skipped" or "first_loss" not in r:
        return r.get("reason", "")
    if not r.get("losses"):  # nothing trained: the reason and the error say it all
        return f"{r.get('reason', '')}: {r.get('error') or 'no metrics'}"[:160]
    trend = "falling" if r.get("falling") else "NOT falling"
    s = (
        f"loss {_num(r.get('first_loss'), '{:.2f}')}->{_num(r.get('last_loss'), '{:.2f}')} "
        f"{trend} | {_num(r.get('tokens_per_s'), '{:.0f}')} tok/s | "
        f"{_num(r.get('tflops_per_gpu'), '{:.3g}')} TFLOP/s | mfu "
        f"{_num(r['mfu'] * 100, '{:.1f}%') if r.get('mfu') is not None else '-'} | "
        f"{_num(r.get('mem_gb'), '{:.1f}')} GB"
    )
    return s if r.get("status") == "ok" else f"{r.get('reason', '')}: {s}"


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(section, status, seconds, key numbers) for the summary table."""
    rows = []
    sec = results["sections"]
    for name in SECTIONS:
        s = sec.get(name, skipped("not run"))
        t = _num(s.get("seconds"))
        if name == "env" and s.get("info"):
            keys = _env_keys(s)
            rows.append(
                (
                    name,
                    s["status"],
                    t,
                    keys if s["status"] == "ok" else f"{s.get('reason', '')} | {keys}",
                )
            )
        elif name == "gpu_tests" and "passed" in s:
            keys = (
                f"{s['passed']} passed, {s['failed']} failed, {s['errors']} errors, "
                f"{s['skipped']} skipped"
            )
            fails = "; ".join(f["name"].rsplit("::", 1)[-1] for f in s["failures"][:3])
            rows.append((name, s["status"], t, keys + (f" | {fails}" if fails else "")))
        elif name == "training" and "runs" in s:
            rows.append((name, s["status"], t, s.get("reason", "")))
            d = s["data"]
            rows.append(
                (
                    "train:data",
                    d["status"],
                    _num(sum(x["wall_s"] for x in d["steps"].values())),
                    f"{d.get('samples', '-')} samples, vocab {d.get('vocab_size', '-')}"
                    if d["status"] == "ok"
                    else d.get("reason", ""),
                )
            )
            for run, r in s["runs"].items():
                rows.append((f"train:{run}", r["status"], _num(r.get("wall_s")), _run_keys(r)))
        elif name == "step" and s.get("parts"):
            rows.append((name, s["status"], t, s.get("reason", "")))
            rows += step_rows(s)
        elif name == "decode" and s.get("rows"):
            for mode, r in s["rows"].items():
                rows.append(
                    (
                        f"decode:{mode}",
                        s["status"],
                        t,
                        f"DALI {r['dali_img_s']:.1f} img/s | PIL {r['pil_img_s']:.1f} "
                        f"img/s | ratio {r['ratio']:.2f}",
                    )
                )
        else:
            err = f": {s['error']}" if s.get("error") else ""
            rows.append((name, s["status"], t, (s.get("reason", "") + err)[:160]))
    made = [s["status"] for s in sec.values() if not s.get("reason", "").startswith("not sel")]
    total = "ok" if made and all(x == "ok" for x in made) else "partial"
    rows.append(
        (
            "total",
            total,
            _num(results.get("wall_s")),
            f"{sum(x == 'ok' for x in made)} of {len(made)} section(s) ok",
        )
    )
    return rows


def format_table(results: dict) -> str:
    rows = table_rows(results)
    w = max(24, max(len(r[0]) for r in rows) + 1)
    mode = "dry run, CPU" if results["dry_run"] else "GPU"
    lines = [
        f"{TABLE_HEADER} ({mode}; {results['wall_s']:.0f} s) ==",
        f"{'section':<{w}}{'status':<9}{'time_s':>7}  key numbers",
    ]
    lines += [f"{a:<{w}}{b:<9}{c:>7}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def note(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pack_logs(logs: Path, archive: Path) -> None:
    """Every file under `logs` into one .tar.gz (members `logs/<section>/...`); a file over
    MAX_LOG_BYTES keeps only its end (the error is there)."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(p for p in logs.rglob("*") if p.is_file()):
            data = f.read_bytes()
            if len(data) > MAX_LOG_BYTES:
                data = b"[gpu_check: truncated to its last bytes]\n" + data[-MAX_LOG_BYTES:]
            info = tarfile.TarInfo(f"logs/{f.relative_to(logs)}")
            info.size, info.mtime = len(data), int(f.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, archive)


def save(results: dict, logs: Path, out: Path) -> None:
    """results.json and logs.tar.gz, rewritten after every section (a killed check keeps both)."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    try:
        pack_logs(logs, out / LOGS_ARCHIVE)
    except OSError as e:  # the logs are a convenience; results.json is what matters
        note(f"could not pack the logs: {e}")


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: local backend, tiny, no FP8")
    p.add_argument("--out", help="output folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET", BUDGET_S)),
        help=f"seconds for the whole check (default {BUDGET_S:.0f})",
    )
    p.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="NAME=S",
        help=f"a step's timeout; names: {', '.join(TIMEOUTS)}",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated subset to run (the others are recorded as skipped)",
    )
    return p.parse_args(argv)


def run_all(
    a: argparse.Namespace, timeouts: dict[str, float], chosen: list[str], out: Path, logs: Path
) -> int:
    budget = Budget(a.budget)
    results: dict[str, Any] = {
        "dry_run": a.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "out": str(out),
        "budget_s": a.budget,
        "timeouts_s": timeouts,
        "python": PY,
        "logs": LOGS_ARCHIVE,
        "sections": {},
        "wall_s": 0.0,
    }
    for name in SECTIONS:
        if name not in chosen:
            results["sections"][name] = skipped("not selected (--sections)")
            continue
        note(f"{name}: start ({budget.left():.0f} s of budget left)")
        results["sections"][name] = guarded(
            lambda: RUNNERS[name](logs, budget, timeouts, a.dry_run)
        )
        results["wall_s"] = round(budget.elapsed(), 2)
        save(results, logs, out)
        note(f"{name}: {results['sections'][name]['status']}")
    results["wall_s"] = round(budget.elapsed(), 2)
    save(results, logs, out)
    table = format_table(results)
    (out / "summary.txt").write_text(table + "\n")
    print(f"results: {out / 'results.json'}, logs: {out / LOGS_ARCHIVE}", flush=True)
    print(table, flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    timeouts = parse_timeouts(a.timeout, os.environ.get("GPU_CHECK_TIMEOUTS", ""))
    chosen = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown section(s) {unknown}; choose from {SECTIONS}")
    out = Path(a.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Logs live in scratch space and travel as ONE archive: the device tool brings back at
    # most 8 files from $OUT.
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    try:
        return run_all(a, timeouts, chosen, out, logs)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # usage errors: say so, still exit 0 (the check never fails a run)
        if e.code not in (None, 0):
            print(
                e.code if isinstance(e.code, str) else f"gpu_check: exit {e.code}", file=sys.stderr
            )
    except Exception:  # a driver bug outside the guarded sections: report, still exit 0
        traceback.print_exc()
    sys.exit(0)
