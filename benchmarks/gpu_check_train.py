"""The training section of benchmarks/gpu_check.py: tiny synthetic data, short real-trainer runs.

Data is made the way examples/quickstart.sh makes it (data_tools synthetic captions ->
sentencepiece tokenizer with NaViL's special tokens -> navil-preprocess shards), once, in a
scratch directory outside the output folder; every run reuses it. Each run is
`python -m torch.distributed.run --standalone --nproc_per_node 1 -m megatron_navil.cli.pretrain`
with examples/configs/debug.yaml as the base and its own `--metrics-file`; the run's summary
comes from that JSONL file (fields in README.md, "Metrics").
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from gpu_check_proc import Budget, ProcResult, run_logged

PY = sys.executable


@dataclass(frozen=True)
class RunSpec:
    """One short training run."""

    name: str
    args: tuple[str, ...]
    """Flags and overrides on top of the common ones (model, precision, batch geometry)."""
    timeout_key: str
    """Which configurable timeout applies (train_debug or train_2b)."""
    skip_reason: Optional[str] = None
    """Set when the run is recorded but not made (e.g. FP8 in a dry run)."""


@dataclass(frozen=True)
class Dataset:
    """The synthetic set every run trains on."""

    train: Path
    tokenizer: Path
    vocab_size: int
    first_special_token_id: int
    samples: int


DEBUG = ("--config", "examples/configs/debug.yaml")
TE = ("precision.backend=transformer_engine",)  # explicit: a silent fallback to local must fail
# navil-2b widths (LLM 2048/8192, GQA 16/8, ViT 1536/6144, 256..24576 patches) at 2+2 layers.
NAVIL_2B_L2 = (
    "--model",
    "navil-2b",
    "model.llm.num_layers=2",
    "model.vision.num_layers=2",
    "--seq-length",
    "8192",
    "--global-batch-size",
    "8",
    "--lr",
    "3e-4",
    "data.max_images_per_pack=128",
)  # ~95 captioned images fill an 8192-token pack


def run_specs(dry_run: bool) -> list[RunSpec]:
    """The runs of this mode; a dry run makes only the CPU debug run and records the rest."""
    skip = "dry run" if dry_run else None
    first = (
        RunSpec("debug-fp32", DEBUG + ("precision.backend=local",), "train_debug")
        if dry_run
        else RunSpec("debug-bf16", DEBUG + ("--bf16",) + TE, "train_debug")
    )
    # FP8 tensorwise runs in gpu_tests (tests/gpu: its 30-step curve against bf16); here the
    # real-data loader path gets bf16 and delayed scaling at both sizes.
    return [
        first,
        RunSpec(
            "debug-fp8-delayed",
            DEBUG + ("--bf16", "--fp8-recipe", "delayed") + TE,
            "train_debug",
            skip,
        ),
        RunSpec("2b-l2-bf16", DEBUG + NAVIL_2B_L2 + ("--bf16",) + TE, "train_2b", skip),
        RunSpec(
            "2b-l2-fp8-delayed",
            DEBUG + NAVIL_2B_L2 + ("--bf16", "--fp8-recipe", "delayed") + TE,
            "train_2b",
            skip,
        ),
    ]


def make_dataset(
    work: Path, logs: Path, budget: Budget, timeout_s: float, num_train: int
) -> tuple[Optional[Dataset], dict[str, Any]]:
    """Captions -> tokenizer -> shards under `work`; (the dataset or None, its record)."""
    raw, tok, train = work / "raw", work / "tokenizer", work / "data" / "train"
    steps = [
        (
            "captions",
            [
                PY,
                "-m",
                "data_tools.synthetic_captions",
                "--output",
                str(raw),
                "--num-train",
                str(num_train),
                "--num-valid",
                "0",
                "--size",
                "128",
            ],
        ),
        (
            "tokenizer",
            [
                PY,
                "-m",
                "data_tools.tokenizer_cli",
                "train",
                "--input",
                str(raw / "train.jsonl"),
                "--output",
                str(tok),
                "--vocab-size",
                "512",
            ],
        ),
        (
            "preprocess",
            [
                PY,
                "-m",
                "data_tools.preprocess",
                "--input",
                str(raw / "train.jsonl"),
                "--image-root",
                str(raw),
                "--output",
                str(train),
                "--tokenizer",
                str(tok),
                "--samples-per-shard",
                "256",
                "--num-workers",
                "2",
            ],
        ),
    ]
    record: dict[str, Any] = {"status": "ok", "dir": str(work), "steps": {}}
    deadline = Budget(timeout_s)  # one allowance for the three steps together
    for name, cmd in steps:
        grant = budget.grant(deadline.left())
        if grant is None:
            record.update(status="timeout", reason=f"no time left before {name}")
            return None, record
        res = run_logged(cmd, logs / f"data_{name}", grant)
        record["steps"][name] = {"rc": res.rc, "wall_s": round(res.wall_s, 2)}
        if res.timed_out or res.rc != 0:
            record.update(
                status="timeout" if res.timed_out else "failed",
                reason=f"{name}: " + ("timed out" if res.timed_out else f"exit {res.rc}"),
                error=res.first_error(),
                error_tail=res.tail(),
            )
            return None, record
    meta = json.loads((tok / "navil_tokenizer.json").read_text())
    ds = Dataset(
        train, tok, int(meta["vocab_size"]), int(meta["first_special_token_id"]), num_train
    )
    record.update(
        samples=num_train,
        vocab_size=ds.vocab_size,
        first_special_token_id=ds.first_special_token_id,
    )
    return ds, record


def train_command(spec: RunSpec, ds: Dataset, metrics: Path, steps: int) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "megatron_navil.cli.pretrain",
        *spec.args,
        "--data-path",
        str(ds.train),
        "--tokenizer-model",
        str(ds.tokenizer),
        "--metrics-file",
        str(metrics),
        "--train-iters",
        str(steps),
        "--lr-warmup-iters",
        "3",
        "--eval-interval",
        "0",
        "--log-interval",
        "5",
        f"model.llm.vocab_size={ds.vocab_size}",
        f"model.llm.first_special_token_id={ds.first_special_token_id}",
        "logging.progress_bar=off",
        "data.num_decode_threads=4",
    ]


def _rel(path: Path, root: Path) -> str:
    """The file's name inside logs.tar.gz."""
    return f"logs/{path.relative_to(root)}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One row per step (the last one written for a step wins), in step order."""
    rows: dict[int, dict[str, Any]] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[int(r["step"])] = r
    except (OSError, ValueError, KeyError):
        pass
    return [rows[s] for s in sorted(rows)]


def _median(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def loss_summary(losses: list[Optional[float]]) -> dict[str, Any]:
    """first/last loss; finite = every step's loss finite; falling = mean of the last 5 below
    the mean of the first 5 (halves when there are fewer than 10 steps)."""
    finite = bool(losses) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses)
    k = min(5, len(losses) // 2)
    falling = bool(finite and k and sum(losses[-k:]) / k < sum(losses[:k]) / k)
    return {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "finite": finite,
        "falling": falling,
    }


def summarize_run(
    res: ProcResult, rows: list[dict[str, Any]], steps: int, log_root: Path
) -> dict[str, Any]:
    """The run's record: status, losses, steady-state throughput (median after 3 warm-up
    steps), peak memory."""
    losses = [r.get("loss") for r in rows]
    steady = rows[3:] if len(rows) > 6 else rows
    mem = [r["mem_gb"] for r in rows if isinstance(r.get("mem_gb"), (int, float))]
    rec: dict[str, Any] = {
        "exit_code": res.rc,
        "timed_out": res.timed_out,
        "wall_s": round(res.wall_s, 2),
        "steps_done": len(rows),
        "steps": steps,
        **loss_summary(losses),
        "losses": losses,
        "tokens_per_s": _median(steady, "tokens_per_s"),
        "tflops_per_gpu": _median(steady, "tflops_per_gpu"),
        "mfu": _median(steady, "mfu"),
        "mfu_fp8": _median(steady, "mfu_fp8"),  # FP8 runs: against the dense FP8 peak
        "mem_gb": max(mem) if mem else None,
        "stdout": _rel(res.stdout, log_root),
        "stderr": _rel(res.stderr, log_root),
    }
    if res.timed_out:
        rec.update(status="timeout", reason=f"timed out after {res.wall_s:.0f} s")
    elif res.rc != 0:
        rec.update(status="failed", reason=f"exit {res.rc}")
    elif len(rows) < steps:
        rec.update(status="failed", reason=f"{len(rows)} of {steps} steps in the metrics file")
    elif not rec["finite"]:
        rec.update(status="failed", reason="non-finite loss")
    elif not rec["falling"]:
        rec.update(status="failed", reason="loss not falling")
    else:
        rec["status"] = "ok"
    if rec["status"] != "ok":
        rec.update(error=res.first_error(), error_tail=res.tail())
    return rec


def run_training(
    log_root: Path,
    work: Path,
    budget: Budget,
    timeouts: dict[str, float],
    dry_run: bool,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """The whole training section: data, then every run (failures recorded, never raised)."""
    logs = log_root / "training"
    steps = 12 if dry_run else 25
    note("training: synthetic data")
    ds, data = make_dataset(work, logs, budget, timeouts["data"], 400 if dry_run else 800)
    runs: dict[str, dict[str, Any]] = {}
    for spec in run_specs(dry_run):
        if spec.skip_reason or ds is None:
            runs[spec.name] = {"status": "skipped", "reason": spec.skip_reason or "no data"}
            continue
        grant = budget.grant(timeouts[spec.timeout_key])
        if grant is None:
            runs[spec.name] = {"status": "skipped", "reason": "out of time budget"}
            continue
        note(f"training: {spec.name} ({steps} steps, timeout {grant:.0f} s)")
        metrics = logs / f"{spec.name}.metrics.jsonl"
        metrics.unlink(missing_ok=True)  # the trainer appends: start clean
        cmd = train_command(spec, ds, metrics, steps)
        res = run_logged(cmd, logs / spec.name, grant)
        runs[spec.name] = {
            **summarize_run(res, read_metrics(metrics), steps, log_root),
            "metrics_file": _rel(metrics, log_root),
            "command": " ".join(cmd),
        }
    made = [r for r in runs.values() if r["status"] != "skipped"]
    if data["status"] != "ok":
        status, reason = data["status"], "data: " + data.get("reason", "")
    elif not made:
        status, reason = "skipped", "no run made"
    elif all(r["status"] == "ok" for r in made):
        status, reason = "ok", f"{len(made)} run(s) ok"
    else:
        bad = [n for n, r in runs.items() if r["status"] not in ("ok", "skipped")]
        status, reason = "failed", "not ok: " + ", ".join(bad)
    return {"status": status, "reason": reason, "steps_per_run": steps, "data": data, "runs": runs}
