"""Soak: a long CPU run of navil-pretrain (debug model, mock data) with periodic saves, watched
from outside for leaks.

    PYTHONPATH=. python benchmarks/soak.py                      # 2,000 steps (about 7 min here)
    PYTHONPATH=. python benchmarks/soak.py --steps 200 --save-interval 20   # a quick look

One trainer process; every --sample-s seconds this script reads the trainer's resident memory
(RSS), that of its helper processes, its open file descriptors and threads (psutil), and the
metrics file gives step times. Targets (issue 14), each comparing the second tenth of the run
(allocators and caches warm, first checkpoint written) with the last tenth, as medians over the
samples of each window (a sample taken during a save sees the writer's transient buffers and
processes): the trainer's resident memory grows < 5%; its file descriptors and threads do not
grow; the median step time is within 10% (throughput ratio >= 0.9).
Checkpoints every --save-interval steps, the newest --keep-last kept, so saving, pruning and
the writer's helper processes are exercised twenty times.
Writes --results (JSON) and prints a table; exit 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sample(proc: psutil.Process) -> dict:
    """The trainer's RSS, fds and threads, and the summed RSS of its helper processes."""
    out = {"t": time.time(), "rss_mb": 0.0, "helpers_rss_mb": 0.0, "fds": 0, "threads": 0}
    for p in _tree(proc):
        try:
            rss = p.memory_info().rss / 2**20
            if p.pid == proc.pid:
                out.update(rss_mb=rss, fds=p.num_fds(), threads=p.num_threads())
            else:
                out["helpers_rss_mb"] += rss
        except psutil.NoSuchProcess:
            continue
    return out


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save-interval", type=int, default=100)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "soak_results.json"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="navil-soak-"))
    m = work / "metrics.jsonl"
    cmd = [sys.executable, "-m", "megatron_navil.cli.pretrain", "--mock-data"]
    cmd += ["--model", "debug-internlm2", "--seq-length", "256", "--global-batch-size", "2"]
    cmd += ["--train-iters", str(args.steps), "--lr", "1e-3", "--lr-warmup-iters", "10"]
    cmd += ["--save", str(work / "ck"), "--save-interval", str(args.save_interval)]
    cmd += ["--metrics-file", str(m), "--log-interval", "100", "logging.progress_bar=off"]
    cmd += [f"checkpoint.keep_last={args.keep_last}"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(29000 + os.getpid() % 1000), PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "2")
    log = open(work / "trainer.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    watched = psutil.Process(proc.pid)
    samples = []
    start = time.time()
    while proc.poll() is None:
        samples.append({**_sample(watched), "step": len(_metrics(m))})
        time.sleep(args.sample_s)
    wall = time.time() - start
    if proc.returncode != 0:
        print((work / "trainer.log").read_text()[-3000:])
        return 1

    recs = _metrics(m)
    times = [r["step_time_s"] for r in recs]
    tenth = max(1, args.steps // 10)
    second = [x for x in samples if tenth <= x["step"] < 2 * tenth] or samples
    last = [x for x in samples if x["step"] >= args.steps - tenth] or samples[-1:]

    def med(window, key):
        return statistics.median(x[key] for x in window)

    second_tenth = statistics.median(times[tenth : 2 * tenth])
    last_tenth = statistics.median(times[-tenth:])
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "steps": args.steps,
        "save_interval": args.save_interval,
        "checkpoints_written": args.steps // args.save_interval,
        "wall_s": round(wall, 1),
        "rss_mb_second_tenth": round(med(second, "rss_mb"), 1),
        "rss_mb_last_tenth": round(med(last, "rss_mb"), 1),
        "rss_growth_pct": round(100 * (med(last, "rss_mb") / med(second, "rss_mb") - 1), 2),
        "rss_mb_max": round(max(x["rss_mb"] for x in samples), 1),
        "helpers_rss_mb_max": round(max(x["helpers_rss_mb"] for x in samples), 1),
        "fds_second_tenth": med(second, "fds"),
        "fds_last_tenth": med(last, "fds"),
        "threads_second_tenth": med(second, "threads"),
        "threads_last_tenth": med(last, "threads"),
        "median_step_s_second_tenth": round(second_tenth, 4),
        "median_step_s_last_tenth": round(last_tenth, 4),
        "throughput_ratio_last_vs_second_tenth": round(second_tenth / last_tenth, 3),
        "final_loss": recs[-1]["loss"],
        "samples": samples[:: max(1, len(samples) // 200)],
    }
    checks = {
        "rss growth < 5%": result["rss_growth_pct"] < 5.0,
        "no fd or thread growth": result["fds_last_tenth"] <= result["fds_second_tenth"]
        and result["threads_last_tenth"] <= result["threads_second_tenth"],
        "steady throughput (>= 0.9)": result["throughput_ratio_last_vs_second_tenth"] >= 0.9,
    }
    result["checks"] = checks
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result.items():
        if k != "samples":
            print(f"{k:42s} {v}")
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and logs (kept when the run failed)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
