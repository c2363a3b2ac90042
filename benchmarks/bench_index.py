"""Benchmark opening and planning over a huge dataset index: the binary index at 1M, 10M and 100M
samples, and the old JSON index (the code before the binary index, from git) at 1M, one run.

    PYTHONPATH=. python benchmarks/bench_index.py --sizes 1000000 10000000 100000000 \
        --json-size 1000000 --ranks 8

Data: a few real WebDataset shards (caption samples: a JSON member and a small JPEG, written by
navil-preprocess's ShardWriter), and for each size a synthetic output whose manifest lists
size / 1000 shards (navil-preprocess's default --samples-per-shard) that point at those real
tars cyclically (the sizes match, so the loader's shard checks pass), with the binary index
written by the production writer (binindex.write_index). Kinds: 85% caption (one image of a
multiple-of-16 size in [224, 1024]), 15% text; token counts plausible for the JSON sizes. The
JSON side writes one index.json per shard, exactly as navil-preprocess does, and no index/.

Per configuration, `--ranks` processes start together (the ranks of one node) and each:
opens the dataset (load_dataset: binary or JSON), builds the planner's state (new: CostModel +
the windowed epoch order; old: refuse_images + sample_costs + GlobalCosts + the whole-epoch
permutation), plans the first window (plan_chunk_samples = 65536, seq_length 8192, navil-2b
image rules), then plans --windows more windows (sampling throughput: samples/s the planner
decides; shuffle blocks of 1024 as DataConfig's default). Binary sizes run with --ranks ranks
and with 1 (the per-rank cost without CPU contention). Memory from /proc/self/smaps_rollup:
`Anonymous` (the rank's own heap: what cannot be shared) and Private_Clean + Private_Dirty
(USS), as deltas over the process before opening, and Rss (mostly the index's shared
page-cache pages the rank touched). Medians over ranks; results JSON (--results).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from old_code import old_tree  # noqa: E402

SAMPLES_PER_SHARD = 1000
SHUFFLE_BLOCK = 1024
"""DataConfig.shuffle_block_samples' default."""
REAL_TARS, REAL_SAMPLES = 4, 256
TOKENIZER_SHA = "bench-tokenizer"
IMAGE_META = {
    "member": "jpg",
    "orientation": 1,
    "format": "jpg",
    "converted_from": None,
    "source_format": "JPEG",
    "digest": "00" * 16,
}


# ----------------------------------------------------------------------------- data
def make_real_shards(out: str) -> list[dict]:
    """REAL_TARS tars of REAL_SAMPLES captions; per tar its size and per-sample member spans."""
    from PIL import Image

    from data_tools.shards import ShardWriter

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    tars = []
    for t in range(REAL_TARS):
        w = ShardWriter(out, f"real{t}")
        spans = []
        for i in range(REAL_SAMPLES):
            key = f"r{t}-{i:06d}"
            doc = {"key": key, "kind": "caption", "text": "a purple rectangle " * (1 + i % 7)}
            placed = w.add([(f"{key}.jpg", jpeg), (f"{key}.json", json.dumps(doc).encode())])
            spans.append([(m.offset, m.size) for m in placed])
        name, _, size = w.finish()
        tars.append({"tar": name, "tar_bytes": size, "spans": spans})
    return tars


def _synthetic_piece(first: int, k: int, real: dict, rng):
    from megatron_navil.data.columns import DIGEST_BYTES, Piece, StringTable

    j = (first + np.arange(k)) % REAL_SAMPLES
    spans = np.asarray(real["spans"], dtype=np.int64)[j]  # [k, 2 members, (offset, size)]
    caption = rng.random(k) < 0.85
    n_img = caption.astype(np.int64)
    img_rows = np.nonzero(caption)[0]
    # keys "s" + 11 digits, built as bytes without a Python string per sample
    ids = (first + np.arange(k, dtype=np.int64))[:, None]
    digits = (ids // 10 ** np.arange(10, -1, -1, dtype=np.int64)) % 10 + ord("0")
    key_bytes = np.concatenate([np.full((k, 1), ord("s")), digits], 1).astype(np.uint8).ravel()
    arrays = {
        "kind": np.where(caption, 0, 3).astype(np.int8),
        "shard": np.zeros(k, np.int32),
        "json_offset": spans[:, 1, 0],
        "json_size": spans[:, 1, 1],
        "text_tokens": rng.integers(8, 100, k).astype(np.int64),
        "entry_refused": np.zeros(k, np.int8),
        "num_images": n_img,
        "digest": rng.integers(0, 256, (k, DIGEST_BYTES), dtype=np.uint8),
        "image_offset": spans[img_rows, 0, 0],
        "image_size": spans[img_rows, 0, 1],
        "image_height": 16 * rng.integers(14, 65, len(img_rows)).astype(np.int64),
        "image_width": 16 * rng.integers(14, 65, len(img_rows)).astype(np.int64),
    }
    m = len(img_rows)
    return Piece(
        arrays,
        StringTable(np.arange(k + 1, dtype=np.int64) * 12, key_bytes),
        StringTable(np.arange(m + 1, dtype=np.int64) * 3, np.frombuffer(b"jpg" * m, np.uint8)),
        {},
    )


def _manifest(root: str, tars: list[dict], n: int) -> list[dict]:
    shards = []
    for s in range(-(-n // SAMPLES_PER_SHARD)):
        real = tars[s % len(tars)]
        k = min(SAMPLES_PER_SHARD, n - s * SAMPLES_PER_SHARD)
        shards.append({"tar": real["tar"], "index": f"shard{s:07d}.index.json"})
        shards[-1].update(num_samples=k, tar_bytes=real["tar_bytes"], dali_index=None)
    manifest = {
        "format_version": 1,
        "created_by": "bench_index.py",
        "num_samples": n,
        "num_shards": len(shards),
        "num_partitions": 1,
        "settings": {"chat_template": "internlm2", "chat_encoding": 2},
        "tokenizer": {"model_sha256": TOKENIZER_SHA},
        "shards": shards,
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return shards


def make_binary(root: str, real_dir: str, tars: list[dict], n: int) -> float:
    from megatron_navil.data.binindex import write_index

    os.makedirs(root, exist_ok=True)
    for t in tars:
        os.link(os.path.join(real_dir, t["tar"]), os.path.join(root, t["tar"]))
    shards = _manifest(root, tars, n)
    rng = np.random.default_rng(0)

    def pieces():
        for s, e in enumerate(shards):
            real = tars[s % len(tars)]
            yield (
                e["tar"],
                e["tar_bytes"],
                e["num_samples"],
                _synthetic_piece(s * SAMPLES_PER_SHARD, e["num_samples"], real, rng),
            )

    t0 = time.perf_counter()
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    write_index(
        root,
        pieces(),
        os.path.join(root, "manifest.json"),
        manifest["settings"],
        manifest["tokenizer"],
    )
    return time.perf_counter() - t0


def make_json(root: str, real_dir: str, tars: list[dict], n: int) -> None:
    """The same samples as per-shard index.json files (what navil-preprocess writes), no index/."""
    os.makedirs(root, exist_ok=True)
    for t in tars:
        os.link(os.path.join(real_dir, t["tar"]), os.path.join(root, t["tar"]))
    shards = _manifest(root, tars, n)
    rng = np.random.default_rng(0)
    for s, e in enumerate(shards):
        p = _synthetic_piece(s * SAMPLES_PER_SHARD, e["num_samples"], tars[s % len(tars)], rng)
        a, r, samples = p.arrays, 0, []
        for i in range(len(p)):
            images = []
            members = {"json": [int(a["json_offset"][i]), int(a["json_size"][i])]}
            for _ in range(int(a["num_images"][i])):
                h, w = int(a["image_height"][r]), int(a["image_width"][r])
                images.append(dict(IMAGE_META, width=w, height=h, path=f"{i}.jpg"))
                members["jpg"] = [int(a["image_offset"][r]), int(a["image_size"][r])]
                r += 1
            samples.append(
                {
                    "key": p.keys[i],
                    "kind": "caption" if a["kind"][i] == 0 else "text",
                    "num_images": len(images),
                    "images": images,
                    "text_tokens": int(a["text_tokens"][i]),
                    "source": {"file": "x.jsonl", "line": i + 1},
                    "digest": bytes(a["digest"][i]).hex(),
                    "members": members,
                }
            )
        with open(os.path.join(root, e["index"]), "w") as f:
            json.dump({"format_version": 1, "samples": samples, "rejected": []}, f)


# ----------------------------------------------------------------------------- one rank
def _smaps() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1]) / 1024  # MB
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


class _Tok:
    sha256 = TOKENIZER_SHA


def rank_main(root: str, impl: str, windows: int) -> dict:
    from megatron_navil.config import get_flavor
    from megatron_navil.data.index import load_dataset
    from megatron_navil.data.planner import EpochPlan, PlanParams
    from megatron_navil.data.sizing import ImageSizer

    cfg = get_flavor("navil-2b")
    params = PlanParams(8192, 64, 8, 65536, "truncate")
    before = _smaps()
    t0 = time.perf_counter()
    ds = load_dataset(root, _Tok(), "internlm2")
    t_open = time.perf_counter() - t0
    sizer = ImageSizer(cfg, False)
    if impl == "new":
        from megatron_navil.data.costs import CostModel
        from megatron_navil.data.order import EpochOrder

        costs = CostModel([ds], sizer, True, 100_000_000, 64)
        order = EpochOrder([len(ds)], (), None, 1234, 0, True, params.chunk, SHUFFLE_BLOCK)
    else:  # the loader before the binary index: whole-corpus arrays and permutation
        from megatron_navil.data.planner import GlobalCosts, epoch_order
        from megatron_navil.data.sizing import sample_costs

        ds.refuse_images(100_000_000)
        c = sample_costs(ds, sizer, True)
        costs = GlobalCosts(c.length, c.num_images, c.max_image_tokens, ds.refused)
        order = epoch_order([len(ds)], (), None, 1234, 0, True)
    t_ready = time.perf_counter() - t0
    opened = _smaps()
    plan = EpochPlan(order, costs, params, 0, 8)
    t1 = time.perf_counter()
    plan._plan_next()
    t_first = time.perf_counter() - t1
    first = _smaps()
    t2 = time.perf_counter()
    for _ in range(windows):
        plan._plan_next()
    rate = windows * params.chunk / (time.perf_counter() - t2)
    last = _smaps()
    import megatron_navil

    return {
        "code": os.path.dirname(megatron_navil.__file__),
        "open_s": t_open,
        "ready_s": t_ready,
        "first_window_s": t_first,
        "sampling_samples_per_s": rate,
        "anon_open_mb": opened["Anonymous"] - before["Anonymous"],
        "anon_first_window_mb": first["Anonymous"] - before["Anonymous"],
        "anon_after_sampling_mb": last["Anonymous"] - before["Anonymous"],
        "uss_open_mb": opened["Private"] - before["Private"],
        "uss_after_sampling_mb": last["Private"] - before["Private"],
        "rss_after_sampling_mb": last["Rss"],
        "samples": len(ds),
    }


def run_ranks(root: str, impl: str, ranks: int, windows: int, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--rank", root, "--impl", impl, "--windows", str(windows)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(ranks)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"rank failed ({impl}, {root})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    keys = [k for k in outs[0] if k not in ("samples", "code")]
    row = {k: statistics.median(o[k] for o in outs) for k in keys}
    row.update(samples=outs[0]["samples"], ranks=ranks, max_open_s=max(o["open_s"] for o in outs))
    row["code"] = outs[0]["code"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--json-size", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--old-commit", default="4aa4776", help="the loader before the binary index")
    ap.add_argument("--workdir", default="/tmp/navil-bench-index")
    ap.add_argument("--results", default=os.path.join(REPO, "benchmarks/bench_index_results.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank:
        print(json.dumps(rank_main(a.rank, a.impl, a.windows)))
        return
    os.makedirs(a.workdir, exist_ok=True)
    real_dir = os.path.join(a.workdir, "real")
    if os.path.isdir(real_dir):
        shutil.rmtree(real_dir)
    os.makedirs(real_dir)
    tars = make_real_shards(real_dir)
    rows = []
    if a.json_size:
        root = os.path.join(a.workdir, f"json-{a.json_size}")
        shutil.rmtree(root, ignore_errors=True)
        make_json(root, real_dir, tars, a.json_size)
        old = old_tree(a.workdir, a.old_commit)
        row = run_ranks(root, "old", a.ranks, a.windows, old)
        rows.append({"index": f"old JSON index (loader at {a.old_commit})", **row})
        print(json.dumps(rows[-1]), flush=True)
        if not a.keep:
            shutil.rmtree(root)
    for n in a.sizes:
        root = os.path.join(a.workdir, f"bin-{n}")
        shutil.rmtree(root, ignore_errors=True)
        build_s = make_binary(root, real_dir, tars, n)
        disk = os.path.getsize(os.path.join(root, "index", "columns.bin"))
        for ranks in sorted({1, a.ranks}):  # alone: the per-rank cost without CPU contention
            row = {"index": "binary index", **run_ranks(root, "new", ranks, a.windows, REPO)}
            row.update(build_s=build_s, index_bytes=disk, shards=-(-n // SAMPLES_PER_SHARD))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not a.keep:
            shutil.rmtree(root)
    same = [
        r
        for r in rows
        if r["index"] == "binary index" and r["samples"] == a.json_size and r["ranks"] == a.ranks
    ]
    ratio = None
    if a.json_size and same:
        ratio = {k: rows[0][k] / max(same[0][k], 1e-9) for k in ("ready_s", "anon_first_window_mb")}
    result = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "ranks": a.ranks,
        "plan_chunk_samples": 65536,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "rows": rows,
        "old_over_new_at_json_size": ratio,
        "command": "PYTHONPATH=. python benchmarks/bench_index.py " + " ".join(sys.argv[1:]),
    }
    with open(a.results, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
