"""The joint scaling study in miniature, on CPU: 3 LLM widths x 3 ViT widths x 2 data budgets of
the debug family on the quickstart's captioning data (captions that describe the images, so a
better encoder can lower the loss), through `navil-scaling sweep` and `navil-scaling fit`.

    PYTHONPATH=. python benchmarks/scaling_micro_grid.py            # ~15-20 min on 2 cores
    PYTHONPATH=. python benchmarks/scaling_micro_grid.py --quick    # 2 x 2 x 1, a few minutes

Steps: make the data (navil-make-captions, navil-tokenizer, navil-preprocess) in a work dir,
measure samples per pack with a 2-step probe run, run the grid 2 cells at a time, fit. Writes
into benchmarks/scaling_micro_grid/: grid.yaml, results.jsonl (one row per cell), fit.json,
the fit plots, and summary.json (machine, wall time, what the fit found). Whether the grid
reproduces the paper's finding is read off fit.json, not assumed: see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "scaling_micro_grid"

LLM = {  # the debug flavor's LLM (4 layers, 4 heads) at three widths
    "llm32": {"hidden_size": 32, "ffn_hidden_size": 64, "kv_channels": 8},
    "llm64": {"hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16},
    "llm128": {"hidden_size": 128, "ffn_hidden_size": 256, "kv_channels": 32},
}
VIT = {  # the debug encoder (2 layers, 2 heads) at three widths
    "vit16": {"hidden_size": 16, "ffn_hidden_size": 64},
    "vit32": {"hidden_size": 32, "ffn_hidden_size": 128},
    "vit64": {"hidden_size": 64, "ffn_hidden_size": 256},
}


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def make_data(work: Path, num_train: int) -> None:
    run(
        [
            "navil-make-captions",
            "--output",
            str(work / "raw"),
            "--num-train",
            str(num_train),
            "--num-valid",
            "64",
            "--size",
            "128",
        ]
    )
    run(
        [
            "navil-tokenizer",
            "train",
            "--input",
            str(work / "raw" / "train.jsonl"),
            "--output",
            str(work / "tokenizer"),
            "--vocab-size",
            "512",
        ]
    )
    for split in ("train", "valid"):
        run(
            [
                "navil-preprocess",
                "--input",
                str(work / "raw" / f"{split}.jsonl"),
                "--image-root",
                str(work / "raw"),
                "--output",
                str(work / "data" / split),
                "--tokenizer",
                str(work / "tokenizer"),
                "--samples-per-shard",
                "256",
                "--num-workers",
                "2",
            ]
        )


def samples_per_pack(work: Path, seq: int, gbs: int) -> float:
    """A 2-step probe run: samples per pack of this data at this sequence length."""
    metrics = work / "probe.jsonl"
    run(
        [
            sys.executable,
            "-m",
            "megatron_navil.cli.pretrain",
            "--model",
            "debug-internlm2",
            "--data-path",
            str(work / "data" / "train"),
            "--tokenizer-model",
            str(work / "tokenizer"),
            "--seq-length",
            str(seq),
            "--global-batch-size",
            str(gbs),
            "--train-iters",
            "2",
            "--metrics-file",
            str(metrics),
            "logging.progress_bar=off",
        ],
        env=dict(os.environ, MASTER_PORT="29731"),
    )
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return sum(r["num_samples"] for r in rows) / (gbs * len(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 x 2 x 1 grid (checks the script)")
    p.add_argument("--work", help="work directory (default: a temporary one, removed)")
    p.add_argument("--budgets", type=int, nargs="+", default=[3000, 12000])
    p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args()
    t0 = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="navil-scaling-"))
    seq, gbs = 512, 4
    try:
        if not (work / "data" / "valid").exists():
            make_data(work, 3000)
        spp = samples_per_pack(work, seq, gbs)
        llm, vit, budgets = LLM, VIT, args.budgets
        if args.quick:
            llm = {k: LLM[k] for k in ("llm32", "llm64")}
            vit = {k: VIT[k] for k in ("vit16", "vit32")}
            budgets = budgets[:1]
        grid = {
            "flavor": "debug-internlm2",
            "llm": llm,
            "vit": vit,
            "budgets_samples": budgets,
            "samples_per_pack": round(spp, 3),
            "seq_length": seq,
            "global_batch_size": gbs,
            "lr": 2e-3,
            "min_lr": 1e-4,
            "warmup_fraction": 0.05,
            "num_evals": 4,
            "eval_iters": 4,
            "mock_data": False,
            "data_path": [str(work / "data" / "train")],
            "valid_data_path": [str(work / "data" / "valid")],
            "tokenizer": str(work / "tokenizer"),
        }
        out = OUT if not args.quick else work / "quick"
        out.mkdir(parents=True, exist_ok=True)
        spec = work / "grid.yaml"
        spec.write_text(json.dumps(grid, indent=1))
        sweep_dir = work / ("sweep" if args.quick else "sweep-full")
        t_sweep = time.time()
        run(
            [
                "navil-scaling",
                "sweep",
                str(spec),
                "--out",
                str(sweep_dir),
                "--parallel",
                str(args.parallel),
            ]
        )
        t_sweep = time.time() - t_sweep
        shutil.copy(sweep_dir / "results.jsonl", out / "results.jsonl")
        run(["navil-scaling", "fit", str(out / "results.jsonl"), "--out", str(out)])
        fit = json.loads((out / "fit.json").read_text())
        grid.update(
            data_path=["<work>/data/train"],
            valid_data_path=["<work>/data/valid"],
            tokenizer="<work>/tokenizer",
        )
        (out / "grid.json").write_text(json.dumps(grid, indent=1) + "\n")
        summary = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_at_end": list(os.getloadavg()),
            },
            "cells": fit["cells_total"],
            "sweep_wall_s": round(t_sweep, 1),
            "total_wall_s": round(time.time() - t0, 1),
            "samples_per_pack": spp,
            "law": fit["law"],
            "vit_optima": [
                {k: f[k] for k in ("llm", "budget_samples", "v_opt", "edge", "best_measured")}
                for f in fit["vit_fits"]
            ],
            "problems": fit["problems"],
            "command": "PYTHONPATH=. python benchmarks/scaling_micro_grid.py"
            + (" --quick" if args.quick else ""),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
