"""navil-preprocess: raw image-text corpora -> validated WebDataset shards + index + report.

    navil-preprocess --input 'data/*.jsonl' --image-root data/images --output shards/ \
        --num-workers 8 [--num-partitions 64 --partition-index $SLURM_ARRAY_TASK_ID]
    navil-preprocess --reindex shards/ [--num-workers 8]   # binary index from the JSON indexes
    navil-preprocess --energon shards/                     # + Megatron-Energon's .nv-meta/

Flow: discover inputs -> this partition's records (data_tools.inputs) -> worker processes parse,
decode, convert and spool the image bytes (data_tools.worker) -> results (metadata only) in
input order -> optional dedup, shard boundaries and keys (data_tools.assemble) -> a worker
writes each finished shard (data_tools.shards.write_segment) -> partition report, merged report
when all partitions are done (data_tools.report) and the binary index (data_tools.reindex).
Re-running the same command resumes: committed segments are skipped.
The on-disk format is specified in docs/data_format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any, Optional, Sequence

from data_tools import FORMAT_VERSION
from data_tools.assemble import Job
from data_tools.cli_common import UsageError, write_text
from data_tools.energon import energon_prepare
from data_tools.images import ImageLimits
from data_tools.inputs import discover, iter_records, partition_bounds
from data_tools.parallel import WorkerPool
from data_tools.reindex import build_index, reindex_summary
from data_tools.report import summary_text, try_merge, write_partition_report
from data_tools.resume import load_finished
from data_tools.shards import spool_dir
from data_tools.worker import WorkerConfig, init_worker, process_chunk
from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION
from megatron_navil.data.limits import (
    DEFAULT_MAX_JSON_BYTES,
    MAX_JSON_BYTES_CAP,
)
from megatron_navil.utils.cli import run_cli
from megatron_navil.utils.logging import get_logger
from megatron_navil.utils.progress import Progress

logger = get_logger(__name__)

_FORMATS = {
    "auto": None,
    "caption": "caption",
    "llava": "conversation",
    "conversation": "conversation",
    "interleaved": "interleaved",
    "text": "text",
    "imagefolder": "caption",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="navil-preprocess",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Turn raw image-text corpora into validated WebDataset shards with a "
        "per-shard index (docs/data_format.md). Re-run the same command to resume.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="JSONL/JSON file(s), glob(s) (quote them) or folder(s): a folder of "
        ".jsonl/.json files, or of images with same-name .txt captions",
    )
    p.add_argument("--output", help="output directory (created if missing)")
    p.add_argument(
        "--reindex",
        metavar="DIR",
        default=None,
        help="instead of preprocessing: (re)build DIR/index/, the binary index the training "
        "loader opens, from DIR's JSON indexes (never reads the tars); for outputs made before "
        "it existed or after an index.json was edited",
    )
    p.add_argument(
        "--energon",
        metavar="DIR",
        default=None,
        help="instead of preprocessing: make DIR (a finished output) a Megatron-Energon "
        "dataset by writing its .nv-meta/ with `energon prepare` (needs megatron-energon)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="directory relative image paths are resolved against (default: the "
        "directory of each input file)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=sorted(_FORMATS),
        help="sample kind of every record (auto: detect per record from its keys; "
        "llava = conversation)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (navil-tokenizer) or sentencepiece .model; when "
        "given, the index records text token counts",
    )
    p.add_argument(
        "--chat-template",
        default="internlm2",
        choices=["internlm2", "qwen3"],
        help="template used to count tokens of conversations",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decoding processes (0 = in the main process, for debugging)",
    )
    p.add_argument(
        "--num-partitions",
        type=int,
        default=1,
        help="split the input into this many deterministic parts (one per machine)",
    )
    p.add_argument(
        "--partition-index",
        type=int,
        default=0,
        help="which part this job processes, 0..num-partitions-1 (e.g. $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument(
        "--samples-per-shard", type=int, default=1000, help="close a shard after this many samples"
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=1 << 30,
        help="close a shard before it would exceed this many bytes",
    )
    p.add_argument(
        "--min-image-side",
        type=int,
        default=ImageLimits.min_side,
        help="reject images whose shorter side is below this (pixels)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=ImageLimits.max_pixels,
        help="reject images with more pixels than this, before decoding (decompression-bomb guard)",
    )
    p.add_argument(
        "--max-json-bytes",
        type=int,
        default=DEFAULT_MAX_JSON_BYTES,
        help="reject an input JSONL line, or a sample whose JSON member would be, larger than "
        "this (json_too_large); the loader skips larger members too",
    )
    p.add_argument(
        "--dedup",
        action="store_true",
        help="drop exact duplicates (same text and image bytes) within the partition",
    )
    p.add_argument(
        "--log-every",
        type=float,
        default=30.0,
        help="seconds between progress log lines when not on a terminal",
    )
    return p


def _check_args(a: argparse.Namespace) -> None:
    if not a.input or not a.output:
        raise UsageError("--input and --output are required (or use --reindex DIR)")
    if a.num_partitions < 1 or not 0 <= a.partition_index < a.num_partitions:
        raise UsageError(
            f"--partition-index {a.partition_index} must be in 0.."
            f"{a.num_partitions - 1} (--num-partitions {a.num_partitions})"
        )
    for flag, v, lo in (
        ("--samples-per-shard", a.samples_per_shard, 1),
        ("--max-shard-bytes", a.max_shard_bytes, 4096),
        ("--min-image-side", a.min_image_side, 1),
        ("--max-image-pixels", a.max_image_pixels, 1),
        ("--num-workers", a.num_workers, 0),
        ("--max-json-bytes", a.max_json_bytes, 1),
    ):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if a.max_json_bytes > MAX_JSON_BYTES_CAP:
        raise UsageError(
            f"--max-json-bytes {a.max_json_bytes} is over {MAX_JSON_BYTES_CAP}, the most the "
            "training loader reads for one sample"
        )
    if a.image_root is not None and not os.path.isdir(a.image_root):
        raise UsageError(f"--image-root {a.image_root!r} is not a directory")
    if os.path.exists(a.output) and not os.path.isdir(a.output):
        raise UsageError(f"--output {a.output!r} exists and is not a directory")


def _tokenizer_info(path: Optional[str]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    from megatron_navil.data.tokenizer import NaViLTokenizer, TokenizerError

    if not os.path.exists(path):
        raise UsageError(f"--tokenizer {path!r} does not exist; make one with navil-tokenizer")
    try:
        tok = NaViLTokenizer.load(path)
    except TokenizerError as e:
        raise UsageError(f"--tokenizer: {e}") from None
    meta = tok.metadata()
    meta["path"] = os.path.abspath(path)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    if a.reindex is not None:
        return _reindex(a)
    if a.energon is not None:
        write_text(f"Megatron-Energon metadata: {energon_prepare(a.energon, a.num_workers)}")
        return 0
    _check_args(a)
    root, files = discover(a.input)
    tok = _tokenizer_info(a.tokenizer)
    limits = ImageLimits(a.min_image_side, a.max_image_pixels)
    forced = _FORMATS[a.format]
    settings = {
        "format_version": FORMAT_VERSION,
        "input_root": root,
        "inputs": [[f.rel, f.kind, f.size] for f in files],
        "format": a.format,
        "image_root": os.path.abspath(a.image_root) if a.image_root else None,
        "samples_per_shard": a.samples_per_shard,
        "max_shard_bytes": a.max_shard_bytes,
        "min_image_side": a.min_image_side,
        "max_image_pixels": a.max_image_pixels,
        "max_json_bytes": a.max_json_bytes,
        "dedup": a.dedup,
        "chat_template": a.chat_template,
        "chat_encoding": CHAT_ENCODING_VERSION,
        "tokenizer_sha256": tok["model_sha256"] if tok else None,
        "num_partitions": a.num_partitions,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(a.output, exist_ok=True)
    total = sum(f.size for f in files)
    lo, hi = partition_bounds(total, a.num_partitions, a.partition_index)
    logger.info(
        "partition %d/%d: %d inputs, bytes [%d, %d) of %d, %d workers",
        a.partition_index,
        a.num_partitions,
        len(files),
        lo,
        hi,
        total,
        a.num_workers,
    )

    state = load_finished(a.output, a.partition_index, fingerprint)
    records = iter_records(files, lo, hi, a.image_root, a.max_json_bytes)
    cfg = WorkerConfig(forced, limits, a.tokenizer, a.chat_template)
    progress = Progress(f"p{a.partition_index}", log_every_s=a.log_every)
    spools = spool_dir(a.output, a.partition_index)
    os.makedirs(spools, exist_ok=True)
    t0 = time.monotonic()
    first: Optional[tuple[float, int]] = None  # (time, records) when the first results arrived
    with WorkerPool(init_worker, (cfg,), a.num_workers) as pool:
        job = Job(a, fingerprint, state, pool)
        try:
            chunks = _chunks(records, state.records_done, spools)
            for results in pool.ordered(process_chunk, chunks):
                if first is None:
                    first = (time.monotonic(), len(results))
                for r in results:
                    job.consume(r)
                job.chunk_done(results[0].spool if results else None)
                progress.update(len(results), written=job.written, rejected=job.rejected_now)
            job.finish()  # the last segment, and every write still running
        except BaseException:
            job.abort()  # unfinished segments are redone by the next run
            raise
        finally:
            progress.close()
    t1 = time.monotonic()
    report = job.partition_report(settings, tok, t1 - t0)
    if first is not None:  # steady state: without worker start-up (what the benchmark reports)
        report["this_run"]["startup_s"] = first[0] - t0
        report["this_run"]["steady_samples_per_s"] = (job.read_now - first[1]) / max(
            t1 - first[0], 1e-9
        )
    write_partition_report(a.output, a.partition_index, report, job.rejected_rows())
    merged = try_merge(a.output, a.num_partitions)
    if merged is not None:  # the last partition: concatenate the shards' pieces
        build_index(a.output, use_pieces=True)
    write_text(summary_text(report, merged, a.output))
    return 0


def _reindex(a: argparse.Namespace) -> int:
    if a.input or a.output:
        raise UsageError("--reindex DIR takes no --input/--output")
    if not os.path.isdir(a.reindex):
        raise UsageError(f"--reindex {a.reindex!r} is not a directory")
    t0 = time.monotonic()
    meta = build_index(a.reindex, use_pieces=False, num_workers=max(a.num_workers, 0))
    write_text(reindex_summary(meta, a.reindex, time.monotonic() - t0))
    return 0


def _chunks(records, skip: int, spools: str, size: int = 8):
    """Group records into small chunks (amortises inter-process overhead for text-only data),
    skipping the ones finished segments already consumed; each chunk gets the spool file its
    worker writes the accepted images to (the parent never receives image bytes)."""
    chunk, n = [], 0
    for rec in records:
        if rec.ordinal < skip:
            continue
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk, os.path.join(spools, f"{n:09d}.bin")
            chunk, n = [], n + 1
    if chunk:
        yield chunk, os.path.join(spools, f"{n:09d}.bin")


if __name__ == "__main__":
    raise SystemExit(main())
