"""`navil-scaling sweep`: run the grid's cells through navil-pretrain and record one row each.

Each cell is a navil-pretrain subprocess (torchrun when nproc_per_cell > 1) writing its metrics
to `<out>/cells/<id>/metrics.jsonl` and its output to `log.txt`; when it ends, one JSON row
(config, tokens and samples seen, validation losses at the evaluation steps, wall time, status)
is appended to `<out>/results.jsonl` under a lock, so SLURM array tasks can share the file.
Resumable: a cell with a row of status ok or diverged is skipped; a failed or missing one runs
again (from its last checkpoint when `checkpoint_interval` is set). The grid is fixed per
output directory (`<out>/sweep_spec.json`): another grid in the same directory is refused.
Locally the cells run one after another or N at a time; `--slurm` writes an sbatch array file
with one cell per task (`navil-scaling sweep --cell $SLURM_ARRAY_TASK_ID`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_navil.errors import UserError
from megatron_navil.scaling.sweep_spec import Cell, SweepSpec, grid, model_sizes
from megatron_navil.utils.files import write_json_atomic
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)
RESULTS = "results.jsonl"
SPEC_COPY = "sweep_spec.json"


class SweepError(UserError):
    """A sweep that cannot run as asked; the message says what to do."""


def mock_samples_per_pack(spec: SweepSpec, packs: int = 60) -> float:
    """Mean samples per pack of navil-pretrain's mock data at the spec's sequence length."""
    from megatron_navil.training.data import MockPackLoader

    section = next(iter(spec.sections().values()))
    loader = MockPackLoader(section.resolve(), spec.seq_length, spec.seed, 0, 1)
    return sum(int(next(loader).metadata["samples"]) for _ in range(packs)) / packs


def cells_of(spec: SweepSpec) -> list[Cell]:
    spp = spec.samples_per_pack or mock_samples_per_pack(spec)
    return grid(spec, spp)


def pretrain_args(spec: SweepSpec, cell: Cell, cell_dir: Path) -> list[str]:
    """navil-pretrain's arguments for one cell."""
    warmup = int(spec.warmup_fraction * cell.train_iters)
    args = ["--model", spec.flavor, "--seq-length", str(spec.seq_length)]
    args += ["--global-batch-size", str(spec.global_batch_size)]
    args += ["--train-iters", str(cell.train_iters), "--eval-interval", str(cell.eval_interval)]
    args += ["--eval-iters", str(spec.eval_iters), "--lr", repr(spec.lr)]
    args += ["--min-lr", repr(spec.min_lr), "--lr-warmup-iters", str(warmup)]
    args += ["--seed", str(spec.seed), "--metrics-file", str(cell_dir / "metrics.jsonl")]
    args += ["logging.progress_bar=off", "--log-interval", str(cell.eval_interval)]
    args += [f"model.{k}={json.dumps(v)}" for k, v in sorted(cell.fields.items())]
    if spec.checkpoint_interval:
        ckpt = str(cell_dir / "checkpoints")
        args += ["--save", ckpt, "--load", ckpt]
        args += ["--save-interval", str(spec.checkpoint_interval)]
    args += list(spec.extra_args)
    # NOTE: the data flags take several words (--data-path A B ...): they come last, so they
    # cannot swallow the section.field=value words navil-pretrain also accepts.
    if spec.mock_data:
        return args + ["--mock-data"]
    args += ["--tokenizer-model", str(spec.tokenizer), "--data-path", *spec.data_path]
    if spec.valid_data_path:
        args += ["--valid-data-path", *spec.valid_data_path]
    return args


def command(spec: SweepSpec, cell: Cell, cell_dir: Path) -> list[str]:
    trainer = ["-m", "megatron_navil.cli.pretrain", *pretrain_args(spec, cell, cell_dir)]
    if spec.nproc_per_cell > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return launcher + ["--nproc_per_node", str(spec.nproc_per_cell), *trainer]
    return [sys.executable, *trainer]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(_free_port())  # concurrent cells must not share a port
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):  # one process per cell
        env.pop(key, None)
    return env


def read_metrics(path: Path) -> list[dict]:
    """The cell's step records; a resumed run's later lines replace the same steps."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off when the cell was killed
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def cell_model(spec: SweepSpec, cell: Cell):
    """The model a cell trains, as navil-pretrain resolves it (the vocabulary follows the
    tokenizer with real data)."""
    from megatron_navil.config.pretrain import PretrainConfig
    from megatron_navil.data.tokenizer import configured_vocabulary

    run = PretrainConfig(model=spec.sections()[(cell.llm, cell.vit)], tokenizer=spec.tokenizer)
    return run.resolved_model(configured_vocabulary(spec.tokenizer))


def build_row(
    spec: SweepSpec, cell: Cell, records: list[dict], rc: int, log_tail: str, wall: float
) -> dict:
    """One JSONL row of a finished (or failed) cell from its metrics records."""
    llm_params, vit_params = model_sizes(cell_model(spec, cell))
    samples = tokens = 0
    evals = []
    for r in records:
        samples += r.get("num_samples") or 0
        tokens += r.get("num_tokens") or 0
        if "valid_loss" in r:
            evals.append(
                {
                    "step": r["step"],
                    "samples": samples,
                    "tokens": tokens,
                    "valid_loss": r["valid_loss"],
                }
            )
    last = records[-1]["step"] if records else 0
    final = evals[-1]["valid_loss"] if evals and evals[-1]["step"] == last else None
    bad = [r["step"] for r in records if not _finite(r.get("loss"))]
    bad += [e["step"] for e in evals if not _finite(e["valid_loss"])]
    if rc == 0 and not bad and last == cell.train_iters and _finite(final):
        status, reason = "ok", None
    elif bad or "non-finite" in log_tail:
        status = "diverged"
        reason = f"non-finite loss at step {min(bad)}" if bad else "non-finite loss"
    else:
        errors = [ln for ln in log_tail.splitlines() if "error" in ln.lower()]
        status = "failed"
        reason = (errors[-1] if errors else f"exit status {rc} at step {last}")[:300]
    return {
        "cell": cell.id,
        "index": cell.index,
        "llm": cell.llm,
        "vit": cell.vit,
        "budget_samples": cell.budget,
        "status": status,
        "reason": reason,
        "llm_params": llm_params,
        "vit_params": vit_params,
        "config": {
            "flavor": spec.flavor,
            "model": cell.fields,
            "train_iters": cell.train_iters,
            "eval_interval": cell.eval_interval,
            "seq_length": spec.seq_length,
            "global_batch_size": spec.global_batch_size,
        },
        "steps": last,
        "samples_seen": samples,
        "tokens_seen": tokens,
        "evals": evals,
        "final_valid_loss": final,
        "wall_time_s": wall,
    }


def append_row(results: Path, row: dict) -> None:
    """One line, appended under an exclusive lock (array tasks share the file)."""
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def finished(results: Path) -> set[str]:
    """Cells with a row of status ok or diverged (a failed cell runs again)."""
    done: dict[str, str] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["cell"]] = r["status"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return {c for c, s in done.items() if s in ("ok", "diverged")}


@dataclass
class Running:
    cell: Cell
    proc: subprocess.Popen
    started: float
    log_file: object
    cell_dir: Path


def _start(spec: SweepSpec, cell: Cell, out: Path) -> Running:
    cell_dir = out / "cells" / cell.id
    cell_dir.mkdir(parents=True, exist_ok=True)
    if not spec.checkpoint_interval:
        (cell_dir / "metrics.jsonl").unlink(missing_ok=True)  # starts over: no stale steps
    log_file = open(cell_dir / "log.txt", "w")
    proc = subprocess.Popen(
        command(spec, cell, cell_dir), env=_env(), stdout=log_file, stderr=subprocess.STDOUT
    )
    return Running(cell, proc, time.time(), log_file, cell_dir)


def _finish(spec: SweepSpec, r: Running, out: Path) -> dict:
    r.log_file.close()
    tail = (r.cell_dir / "log.txt").read_text()[-4000:]
    records = read_metrics(r.cell_dir / "metrics.jsonl")
    row = build_row(spec, r.cell, records, r.proc.returncode, tail, time.time() - r.started)
    append_row(out / RESULTS, row)
    log.info(
        "cell %s: %s, valid loss %s (%.0f s)",
        r.cell.id,
        row["status"],
        row["final_valid_loss"],
        row["wall_time_s"],
    )
    return row


def prepare(spec: SweepSpec, out: Path) -> None:
    """Create the sweep directory, or check that it holds this very grid."""
    out.mkdir(parents=True, exist_ok=True)
    copy = out / SPEC_COPY
    mine = spec.to_dict()
    if copy.exists():
        theirs = json.loads(copy.read_text())
        if theirs != json.loads(json.dumps(mine)):
            raise SweepError(
                f"{out} holds the rows of another grid ({copy}); use a new --out directory, or "
                "delete it to start over"
            )
    else:
        write_json_atomic(copy, mine)


def run_local(
    spec: SweepSpec, out: Path, parallel: int = 1, only: Optional[list[int]] = None
) -> list[dict]:
    """Run the unfinished cells (all, or the grid indices in `only`), `parallel` at a time;
    returns the rows written now."""
    prepare(spec, out)
    cells = cells_of(spec)
    if only is not None:
        bad = [i for i in only if not 0 <= i < len(cells)]
        if bad:
            raise SweepError(f"cell index {bad[0]} outside the grid of {len(cells)} cells")
        cells = [cells[i] for i in only]
    done = finished(out / RESULTS)
    todo = [c for c in cells if c.id not in done]
    log.info(
        "%d cells in the grid, %d finished, %d to run (%d at a time)",
        len(cells),
        len(cells) - len(todo),
        len(todo),
        parallel,
    )
    rows, running = [], []
    try:
        while todo or running:
            while todo and len(running) < parallel:
                running.append(_start(spec, todo.pop(0), out))
            time.sleep(0.2)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                rows.append(_finish(spec, r, out))
    finally:
        for r in running:  # interrupted: stop our cells, they run again next time
            r.proc.terminate()
            r.proc.wait()
            r.log_file.close()
    return rows


def write_sbatch(
    spec_path: str, spec: SweepSpec, out: Path, max_parallel: int, sbatch_args: list[str]
) -> Path:
    """`<out>/sweep.sbatch`: a SLURM array, one cell per task, finished cells skipped."""
    prepare(spec, out)
    n = len(cells_of(spec))
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=navil-scaling --array=0-{n - 1}%{max_parallel}",
        f"#SBATCH --nodes=1 --ntasks=1 --gpus-per-task={spec.nproc_per_cell}",
        f"#SBATCH --output={out}/cells/slurm-%A_%a.out",
        *[f"#SBATCH {a}" for a in sbatch_args],
        "# One grid cell per array task; a task whose cell already has a row exits at once,",
        "# so re-submitting this file finishes the grid (resumable).",
        "set -euo pipefail",
        "# TP communication overlaps compute only with one hardware queue per GPU",
        "export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}",
        f"navil-scaling sweep {shlex.quote(str(Path(spec_path).resolve()))} "
        f'--out {shlex.quote(str(out.resolve()))} --cell "$SLURM_ARRAY_TASK_ID"',
    ]
    path = out / "sweep.sbatch"
    path.write_text("\n".join(lines) + "\n")
    return path
