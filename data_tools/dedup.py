"""navil-dedup: mark exact duplicates across a whole output (all partitions) in its binary index.

    navil-dedup shards/                                        # every bucket, here
    navil-dedup shards/ --num-buckets 64 --bucket-index $SLURM_ARRAY_TASK_ID   # one per task

navil-preprocess --dedup drops duplicates inside one partition only. This second pass reads the
`digest` column of `index/` (blake2b-128 of each sample's text and image bytes) and marks every
later copy of a digest (later = higher sample number: manifest order, then input order) without
rewriting a shard; the training loader skips marked samples (reason `duplicate`, counted in
`skipped_samples`). It is hash-partitioned: bucket b of K owns the digests whose first 8 bytes
are b mod K, so buckets are independent (an array job runs one each). Each bucket streams the
digest column (mapped, 16 bytes per sample) and keeps only its own rows (n / K); it writes
`index/dedup/<build>-b<b>-of-<K>.npy` (the sorted sample numbers it marks). Whichever bucket
finds all K written merges them into `index/duplicate.bin` (uint8 per sample) and
`index/dedup.json` (written last: the marks' commit), and records the count in report.json.
Marks belong to one build of the index: `--reindex` drops them (run navil-dedup again).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import numpy as np

from data_tools.cli_common import UsageError, write_text
from megatron_navil.data.binindex import INDEX_DIR, IndexFormatError, open_columns, read_meta
from megatron_navil.utils.cli import run_cli
from megatron_navil.utils.files import atomic_writer, write_json_atomic
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)

CHUNK_ROWS = 1 << 22
"""Digest rows read per step (64 MiB of the mapping)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="navil-dedup",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Mark exact duplicates across all partitions of a navil-preprocess output "
        "in its binary index (the loader skips them; shards are not rewritten).",
    )
    p.add_argument("output", help="a finished navil-preprocess output directory (with index/)")
    p.add_argument("--num-buckets", type=int, default=1, help="hash buckets (array job size)")
    p.add_argument(
        "--bucket-index",
        type=int,
        default=None,
        help="the one bucket this job does, 0..num-buckets-1 (default: all, one after another)",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    if a.num_buckets < 1:
        raise UsageError(f"--num-buckets must be >= 1, got {a.num_buckets}")
    if a.bucket_index is not None and not 0 <= a.bucket_index < a.num_buckets:
        raise UsageError(f"--bucket-index must be in 0..{a.num_buckets - 1}")
    root = os.path.abspath(a.output)
    try:
        meta = read_meta(root)
        if meta is None:
            raise IndexFormatError(f"{root}: no binary index (index/meta.json)")
        digests = open_columns(root, meta).arrays["digest"]
    except IndexFormatError as e:
        raise UsageError(f"{e}; run navil-preprocess --reindex {root} first") from None
    t0 = time.monotonic()
    buckets = range(a.num_buckets) if a.bucket_index is None else [a.bucket_index]
    marked = 0
    for b in buckets:
        marked += run_bucket(root, meta["build_id"], digests, b, a.num_buckets)
    total = merge(root, meta, a.num_buckets)
    text = (
        f"{len(buckets)} bucket(s) of {a.num_buckets}: {marked} duplicate(s) marked in "
        f"{time.monotonic() - t0:.1f} s"
    )
    if total is not None:
        text += f"; all buckets done: {total} duplicates of {len(digests)} samples marked"
        text += f" ({os.path.join(root, INDEX_DIR, 'duplicate.bin')})"
    else:
        text += "; other buckets still to run (the last one merges)"
    write_text(text)
    return 0


def _bucket_path(root: str, build: str, b: int, k: int) -> str:
    return os.path.join(root, INDEX_DIR, "dedup", f"{build}-b{b:05d}-of-{k:05d}.npy")


def run_bucket(root: str, build: str, digests: np.ndarray, b: int, k: int) -> int:
    """Mark the later copies among the digests of bucket b; returns how many."""
    rows, his, los = [], [], []
    for start in range(0, len(digests), CHUNK_ROWS):
        chunk = np.ascontiguousarray(digests[start : start + CHUNK_ROWS])
        words = chunk.view("<u8").reshape(-1, 2)  # [rows, (first 8 bytes, last 8 bytes)]
        mine = (words[:, 0] % np.uint64(k) == b) & words.any(axis=1)  # zero: no digest
        idx = np.nonzero(mine)[0]
        rows.append(idx + start)
        his.append(words[idx, 0])
        los.append(words[idx, 1])
    row, hi, lo = (np.concatenate(x) if x else np.zeros(0) for x in (rows, his, los))
    order = np.lexsort((row, lo, hi))  # by digest, then sample number: the first copy first
    hi, lo, row = hi[order], lo[order], row[order]
    later = np.zeros(len(row), bool)
    later[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    marks = np.sort(row[later]).astype(np.int64)
    path = _bucket_path(root, build, b, k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_writer(path, "wb") as f:
        np.save(f, marks)
    return len(marks)


def merge(root: str, meta: dict, k: int) -> Optional[int]:
    """duplicate.bin + dedup.json from all K buckets, if they are all written (else None)."""
    paths = [_bucket_path(root, meta["build_id"], b, k) for b in range(k)]
    if not all(os.path.isfile(p) for p in paths):
        return None
    marks = np.zeros(meta["num_samples"], np.uint8)
    for p in paths:
        marks[np.load(p)] = 1
    index = os.path.join(root, INDEX_DIR)
    with atomic_writer(os.path.join(index, "duplicate.bin"), "wb") as f:
        f.write(marks.tobytes())
    total = int(marks.sum())
    info = {"build_id": meta["build_id"], "num_duplicates": total, "num_buckets": k}
    write_json_atomic(os.path.join(index, "dedup.json"), info)
    report = os.path.join(root, "report.json")
    if os.path.isfile(report):  # the accounting of the output, now with the marked duplicates
        with open(report, encoding="utf-8") as f:
            r = json.load(f)
        r["duplicates_marked"] = total
        write_json_atomic(report, r, indent=1)
    logger.info("%s: %d duplicates marked", index, total)
    return total


if __name__ == "__main__":
    raise SystemExit(main())
