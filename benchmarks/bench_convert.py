"""Benchmark navil-convert on a generated NaViL-2B-flavor checkpoint, side by side with the
machine's sequential disk read+write rate.

    PYTHONPATH=. python benchmarks/bench_convert.py --flavor navil-2b --dtype bfloat16

1. generates a random HF NaViL directory of the flavor (streamed, one tensor at a time;
   4.0B parameters with the experts for navil-2b, 8.0 GB in bf16), 5 GiB shards;
2. measures, each in a fresh process (so its peak RSS is its own):
   - baseline: copy the same HF files (read + write + fsync, 64 MiB blocks, no conversion);
   - hf-to-navil: HF directory -> Megatron torch_dist checkpoint;
   - navil-to-hf: Megatron checkpoint -> HF directory;
   before each, the input files are evicted from the page cache (posix_fadvise DONTNEED on
   fsynced, clean pages: no root needed) so every run reads from disk.
3. reports GB/s (bytes of weights moved / wall time, process start-up included) and peak RSS
   (VmHWM of the child) in a table, also written as JSON (--results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = 64 * 1024 * 1024


def generate(cfg, out: Path, dtype, seed: int = 0) -> int:
    """Random HF NaViL directory (streamed); returns the bytes of weights."""
    import torch

    from megatron_navil.conversion.hf_config import to_hf_config
    from megatron_navil.conversion.outputs import write_json
    from megatron_navil.conversion.plan import hf_shapes, pairs
    from megatron_navil.conversion.safetensors_io import ShardedSafetensorsWriter

    shapes = hf_shapes(cfg)
    plan = [(n, dtype, shapes[n]) for p in pairs(cfg) for n in p.hf]
    out.mkdir(parents=True)
    w = ShardedSafetensorsWriter(out, plan)
    g = torch.Generator().manual_seed(seed)
    for name, dt, shape in plan:
        w.write(name, (torch.randn(shape, generator=g) * 0.02).to(dt))
    w.close()
    write_json(out / "config.json", to_hf_config(cfg, str(dtype).replace("torch.", "")))
    return w.total_bytes


def evict(path: Path) -> None:
    """Drop the files' (clean) pages from the page cache so the next read hits the disk."""
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_files(src: Path, dst: Path) -> None:
    """The baseline: read every file and write it elsewhere, fsync'd, in 64 MiB blocks."""
    dst.mkdir()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    for p in sorted(src.iterdir()):
        with open(p, "rb", buffering=0) as fi, open(dst / p.name, "wb", buffering=0) as fo:
            while True:
                n = fi.readinto(buf)
                if not n:
                    break
                fo.write(view[:n])
            os.fsync(fo.fileno())


def child(argv: list[str]) -> None:
    """Run one measured step in this process; print {"seconds", "max_rss_gb"} as JSON."""
    start = time.perf_counter()
    if argv[0] == "copy":
        copy_files(Path(argv[1]), Path(argv[2]))
    else:
        from checkpoint_tools.cli import main

        rc = main(argv + ["--no-progress"])
        if rc:
            raise SystemExit(rc)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "max_rss_gb": peak_rss_bytes() / 1e9}))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a child started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(argv: list[str], evict_path: Path) -> dict:
    evict(evict_path)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2"),
    )
    if p.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{p.stderr[-4000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.perf_counter() - t
    return r


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="navil-2b")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir under /tmp")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/bench_convert_results.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--no-baseline", action="store_true", help="skip the file-copy baseline")
    ap.add_argument(
        "--drop-inputs",
        action="store_true",
        help="delete each step's input once converted (9B flavor: fits the disk)",
    )
    a = ap.parse_args()

    import torch

    from megatron_navil.config import get_flavor
    from megatron_navil.conversion.plan import hf_shapes
    from megatron_navil.utils.dtypes import torch_dtype

    cfg = get_flavor(a.flavor)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        nbytes = generate(cfg, work / "hf", torch_dtype(a.dtype))
        gen_s = time.perf_counter() - t
        rows = []
        steps = [
            (
                "baseline: copy files (read+write+fsync)",
                ["copy", work / "hf", work / "copy"],
                work / "hf",
            ),
            (
                "hf-to-navil",
                ["hf-to-navil", "--hf", work / "hf", "--output", work / "ck"],
                work / "hf",
            ),
            (
                "navil-to-hf",
                ["navil-to-hf", "--load", work / "ck", "--output", work / "hf2"],
                work / "ck",
            ),
        ]
        for name, argv, src in steps[1:] if a.no_baseline else steps:
            r = measure(argv, src)
            rows.append(
                {
                    "step": name,
                    "gb": nbytes / 1e9,
                    "seconds": r["seconds"],
                    "wall_s": r["wall_s"],
                    "gb_per_s": nbytes / 1e9 / r["wall_s"],
                    "max_rss_gb": r["max_rss_gb"],
                }
            )
            if name.startswith("baseline"):
                shutil.rmtree(work / "copy")
            elif a.drop_inputs:
                shutil.rmtree(src)
        base = None if a.no_baseline else rows[0]["gb_per_s"]
        for r in rows:
            r["vs_baseline"] = r["gb_per_s"] / base if base else None
        sizes = [math.prod(s) for s in hf_shapes(cfg).values()]
        params, largest = sum(sizes), max(sizes)
        result = {
            "flavor": a.flavor,
            "dtype": a.dtype,
            "parameters": params,
            "weight_gb": nbytes / 1e9,
            "largest_tensor_gb": largest * torch_dtype(a.dtype).itemsize / 1e9,
            "generate_s": gen_s,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rows": rows,
            "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        }
        a.results.write_text(json.dumps(result, indent=1) + "\n")
        print(
            f"{a.flavor} ({params / 1e9:.2f}B params, {nbytes / 1e9:.2f} GB {a.dtype}); "
            f"largest tensor {result['largest_tensor_gb']:.2f} GB"
        )
        print(f"{'step':42s} {'wall s':>8s} {'GB/s':>7s} {'x copy':>7s} {'peak RSS GB':>12s}")
        for r in rows:
            ratio = f"{r['vs_baseline']:7.2f}" if r["vs_baseline"] else "      -"
            print(
                f"{r['step']:42s} {r['wall_s']:8.1f} {r['gb_per_s']:7.3f} {ratio} "
                f"{r['max_rss_gb']:12.2f}"
            )
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
