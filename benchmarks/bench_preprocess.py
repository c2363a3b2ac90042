"""Benchmark navil-preprocess throughput on realistic 1-2 MP JPEGs, side by side with a plain
PIL decode loop over the same files (so the number means something on a shared machine).

    PYTHONPATH=. python benchmarks/bench_preprocess.py --num-images 120 --repeats 2

Generates JPEGs from scikit-image's bundled photos (upscaled to 1-2 MP, light grain so they are
not unrealistically smooth, quality 90), then measures, in one run:
- baseline: one process doing `Image.open(f).load()` over every file (img/s);
- the real `navil-preprocess` CLI (a subprocess) at each --num-workers: end to end (process
  start-up included) and steady state (as the job reports it, from its first results on).
Per-worker rate, ratio to the baseline and scaling (N workers vs 1) use the steady-state rate;
the table is also written as JSON (--results).
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

import numpy as np
import psutil
import skimage.data as sd
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from old_code import old_tree  # noqa: E402

# (photo, target size): 1.0-2.0 MP, various aspect ratios
PHOTOS = (
    ("astronaut", (1400, 1400)),
    ("coffee", (1500, 1000)),
    ("chelsea", (1500, 1000)),
    ("rocket", (1600, 1067)),
    ("retina", (1411, 1411)),
    ("hubble_deep_field", (1400, 1221)),
    ("immunohistochemistry", (1200, 1200)),
    ("colorwheel", (1100, 1100)),
)


def make_images(d: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    bases = [
        (Image.fromarray(getattr(sd, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        for name, size in PHOTOS
    ]
    names = []
    for i in range(n):
        base = np.asarray(bases[i % len(bases)], dtype=np.int16)
        grain = rng.normal(0, 4, base.shape).astype(np.int16)  # sensor-like noise
        im = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        name = f"img{i:05d}.jpg"
        im.save(os.path.join(d, name), quality=90)
        names.append(name)
    return names


def pil_baseline(d: str, names: list[str]) -> float:
    t = time.perf_counter()
    for n in names:
        with Image.open(os.path.join(d, n)) as im:
            im.load()
    return len(names) / (time.perf_counter() - t)


def run_preprocess(
    jsonl: str, img_dir: str, out: str, workers: int, code: str = REPO
) -> tuple[float, float, object]:
    """(samples/s end to end incl. process start, steady-state samples/s the job reports:
    from its first results to the end, i.e. without interpreter/worker start-up, the main
    process's CPU ms per sample, start-up included, sampled every 20 ms). `code`: the tree
    whose navil-preprocess runs (this checkout, or an older one from git)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "data_tools.preprocess",
        "--input",
        jsonl,
        "--image-root",
        img_dir,
        "--output",
        out,
        "--num-workers",
        str(workers),
        "--samples-per-shard",
        "64",
    ]
    t = time.perf_counter()
    # cwd outside the checkout: `-m` puts the cwd first on sys.path, before `code`
    proc = subprocess.Popen(
        cmd, env=env, cwd=os.path.dirname(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    watch, cpu = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:  # the main process's own CPU time (its workers not included)
        try:
            times = watch.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            break
        time.sleep(0.02)
    if proc.wait():
        raise SystemExit(f"navil-preprocess failed ({code})")
    wall = time.perf_counter() - t
    with open(os.path.join(out, "partitions", "p00000.json")) as f:
        part = json.load(f)
    assert part["counts"]["written"] == part["counts"]["read"], "benchmark images must all pass"
    run = part["this_run"]
    parent = 1000 * cpu / max(run["read"], 1)  # includes interpreter start-up and imports
    return part["counts"]["read"] / wall, run["steady_samples_per_s"], parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=120, help="JPEGs to generate and process")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--num-workers to try")
    p.add_argument("--repeats", type=int, default=2, help="runs per config; the best is kept")
    p.add_argument(
        "--old-commit",
        default=None,
        help="also run navil-preprocess as of this git commit (e.g. 4aa4776: the parent wrote "
        "the tars) side by side",
    )
    p.add_argument(
        "--results",
        default=os.path.join(REPO, "benchmarks", "bench_preprocess_results.json"),
        help="where to write the results JSON",
    )
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_pre_")
    try:
        img_dir = os.path.join(tmp, "img")
        names = make_images(img_dir, a.num_images)
        mp = np.mean([np.prod(Image.open(os.path.join(img_dir, n)).size) / 1e6 for n in names])
        mb = np.mean([os.path.getsize(os.path.join(img_dir, n)) / 1e6 for n in names])
        jsonl = os.path.join(tmp, "caps.jsonl")
        with open(jsonl, "w") as f:
            for n in names:
                f.write(json.dumps({"image": n, "text": f"a photo named {n}"}) + "\n")
        rows = []
        base = max(pil_baseline(img_dir, names) for _ in range(a.repeats))
        rows.append(
            {
                "config": "PIL decode loop, 1 process",
                "workers": 1,
                "samples_per_s": base,
                "pipeline_samples_per_s": base,
            }
        )
        codes = [("", REPO)]
        if a.old_commit:
            codes.append(
                (
                    f" (as of {a.old_commit})",
                    old_tree(tmp, a.old_commit, ("data_tools", "megatron_navil")),
                )
            )
        for label, code in codes:
            for w in a.workers:  # alternate the sides' repeats so load changes hit both
                best = max(
                    (
                        run_preprocess(jsonl, img_dir, os.path.join(tmp, "out"), w, code)
                        for _ in range(a.repeats)
                    ),
                    key=lambda x: x[1],
                )
                rows.append(
                    {
                        "config": f"navil-preprocess --num-workers {w}{label}",
                        "code": label.strip(" ()") or "this checkout",
                        "workers": w,
                        "samples_per_s": best[0],
                        "pipeline_samples_per_s": best[1],
                        "parent_cpu_ms_per_sample": best[2],
                    }
                )
        for r in rows:
            one = next(
                (x for x in rows[1:] if x["workers"] == 1 and x.get("code") == r.get("code")),
                rows[1],
            )
            steady = r["pipeline_samples_per_s"]
            if not one["pipeline_samples_per_s"]:
                raise SystemExit(
                    f"--num-images {a.num_images} is too few for a steady-state rate (the job "
                    "reports none before its first results): use 60 or more"
                )
            r["per_worker"] = steady / r["workers"]
            r["vs_pil_loop"] = steady / base
            r["scaling_vs_1_worker"] = steady / one["pipeline_samples_per_s"]
        result = {
            "images": a.num_images,
            "mean_megapixels": mp,
            "mean_mb": mb,
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "rows": rows,
            "command": "PYTHONPATH=. python "
            + " ".join(["benchmarks/bench_preprocess.py", *sys.argv[1:]]),
        }
        with open(a.results, "w") as f:
            json.dump(result, f, indent=1)
        lines = [
            f"{a.num_images} JPEGs, mean {mp:.2f} MP / {mb:.2f} MB, {os.cpu_count()} CPUs",
            "| config | samples/s end to end | samples/s steady | steady per worker | vs PIL loop "
            "| scaling vs 1 worker | parent CPU ms/sample |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cpu = r.get("parent_cpu_ms_per_sample")
            lines.append(
                f"| {r['config']} | {r['samples_per_s']:.1f} | {r['pipeline_samples_per_s']:.1f} | "
                f"{r['per_worker']:.1f} | {r['vs_pil_loop']:.2f} | {r['scaling_vs_1_worker']:.2f} "
                f"| {'-' if cpu is None else f'{cpu:.2f}'} |"
            )
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
