"""navil-preprocess: raw image-text corpora -> validated WebDataset shards + index + report.

    navil-preprocess --input 'data/*.jsonl' --image-root data/images --output shards/ \
        --num-workers 8 [--num-partitions 64 --partition-index $SLURM_ARRAY_TASK_ID]
    navil-preprocess --reindex shards/ [--num-workers 8]   # binary index from the JSON indexes
    navil-preprocess --energon shards/                     # + Megatron-Energon's .nv-meta/

Flow: discover inputs -> this partition's records (data_tools.inputs) -> worker processes parse,
decode and convert (data_tools.worker) -> results in input order -> optional dedup -> shards
(data_tools.shards) -> partition report, merged report when all partitions are done
(data_tools.report) and the binary index (data_tools.reindex). Re-running the same command
resumes: committed segments are skipped.
The on-disk format is specified in docs/data_format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from typing import Any, Optional, Sequence

from data_tools import FORMAT_VERSION
from data_tools.cli_common import UsageError, write_text
from data_tools.energon import energon_prepare
from data_tools.images import ImageLimits
from data_tools.inputs import discover, iter_records, partition_bounds
from data_tools.parallel import ordered_map
from data_tools.reindex import build_index, reindex_summary
from data_tools.report import summary_text, try_merge, write_partition_report
from data_tools.resume import load_finished
from data_tools.shards import Segment, ShardWriter, sample_entry, sample_key
from data_tools.worker import Result, WorkerConfig, init_worker, process_chunk
from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION
from megatron_navil.data.limits import (
    DEFAULT_MAX_JSON_BYTES,
    MAX_JSON_BYTES_CAP,
    implausible_tokens,
)
from megatron_navil.utils.cli import run_cli
from megatron_navil.utils.logging import get_logger
from megatron_navil.utils.progress import Progress

logger = get_logger(__name__)

_TAR_END = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this
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
    job = _Job(a, fingerprint, state)
    records = iter_records(files, lo, hi, a.image_root, a.max_json_bytes)
    cfg = WorkerConfig(forced, limits, a.tokenizer, a.chat_template)
    progress = Progress(f"p{a.partition_index}", log_every_s=a.log_every)
    t0 = time.monotonic()
    first: Optional[tuple[float, int]] = None  # (time, records) when the first results arrived
    try:
        for results in ordered_map(
            process_chunk, init_worker, (cfg,), _chunks(records, state.records_done), a.num_workers
        ):
            if first is None:
                first = (time.monotonic(), len(results))
            for r in results:
                job.consume(r)
            progress.update(len(results), written=job.written, rejected=job.rejected_now)
    except BaseException:
        job.abort_open()  # drop the unfinished tar; the next run redoes that segment
        raise
    finally:
        progress.close()
    job.close_segment(job.next_ordinal)
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


def _chunks(records, skip: int, size: int = 8):
    """Group records into small chunks (amortises inter-process overhead for text-only data),
    skipping the ones finished segments already consumed."""
    chunk = []
    for rec in records:
        if rec.ordinal < skip:
            continue
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _oversized(json_member: bytes, text_tokens: Optional[int], limit: int):
    """(reason, detail) for a sample too big to write, else (None, ""); megatron_navil/data/
    limits.py has the rules the loader applies to the same numbers."""
    if len(json_member) > limit:
        return (
            "json_too_large",
            f"sample JSON of {len(json_member)} bytes > --max-json-bytes {limit}",
        )
    if text_tokens is not None and implausible_tokens(text_tokens, len(json_member)):
        return (
            "implausible_tokens",
            f"{text_tokens} text tokens from a JSON of {len(json_member)} bytes: the tokenizer "
            "emits more ids than bytes",
        )
    return None, ""


class _Job:
    """Assembles results (in input order) into segments and shards; holds the accounting."""

    def __init__(self, a: argparse.Namespace, fingerprint: str, state):
        self.a, self.fp, self.state = a, fingerprint, state
        self.segments: list[dict] = state.segments  # committed index.json contents, in order
        self.seen: dict[str, str] = state.seen_digests
        self.next_segment = len(self.segments)
        self.next_ordinal = state.records_done
        self.seg: Optional[Segment] = None
        self.writer: Optional[ShardWriter] = None
        self.written = sum(s["counts"]["written"] for s in self.segments)
        self.rejected_now = self.read_now = self.written_now = 0

    def _open(self, ordinal: int) -> Segment:
        if self.seg is None:
            self.seg = Segment(self.a.partition_index, self.next_segment, self.fp, ordinal, ordinal)
        return self.seg

    def consume(self, r: Result) -> None:
        self.read_now += 1
        self.next_ordinal = r.ordinal + 1
        if r.reason is None and self.a.dedup and r.digest in self.seen:
            r.reason, r.detail = "duplicate", f"same content as sample {self.seen[r.digest]}"
        seg = self._open(r.ordinal)
        if r.reason is None:
            key = sample_key(seg.stem, len(seg.samples))
            members, meta = sample_entry(key, r)
            r.reason, r.detail = _oversized(members[-1][1], r.text_tokens, self.a.max_json_bytes)
        if r.reason is not None:
            seg.read += 1
            seg.rejected[r.reason] = seg.rejected.get(r.reason, 0) + 1
            seg.rejected_samples.append(
                {"source": r.source, "reason": r.reason, "detail": r.detail}
            )
            self.rejected_now += 1
            return
        if (
            self.writer is not None
            and seg.samples
            and self.writer.nbytes + ShardWriter.sample_bytes(members) + _TAR_END
            > self.a.max_shard_bytes
        ):
            self.close_segment(r.ordinal)  # this sample starts the next shard
            seg = self._open(r.ordinal)
            key = sample_key(seg.stem, 0)
            members, meta = sample_entry(key, r)
        if self.writer is None:
            self.writer = ShardWriter(self.a.output, seg.stem)
        placed = self.writer.add(members)
        meta["members"] = {m.name.split(".", 1)[1]: [m.offset, m.size] for m in placed}
        seg.read += 1
        seg.samples.append(meta)
        self.written += 1
        self.written_now += 1
        if self.a.dedup:
            self.seen[r.digest] = key
        if len(seg.samples) >= self.a.samples_per_shard:
            self.close_segment(r.ordinal + 1)

    def close_segment(self, records_end: int) -> None:
        seg = self.seg
        if seg is None:
            return
        seg.records_end = records_end
        if self.writer is not None:
            seg.tar, seg.idx, seg.tar_bytes = self.writer.finish()
        seg.commit(self.a.output, FORMAT_VERSION)  # the commit point of this segment
        self.segments.append(seg.to_json(FORMAT_VERSION))
        self.seg, self.writer = None, None
        self.next_segment += 1

    def abort_open(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.seg, self.writer = None, None

    def rejected_rows(self) -> list[dict]:
        return [row for s in self.segments for row in s["rejected"]]

    def partition_report(self, settings: dict, tok: Optional[dict], elapsed: float) -> dict:
        rejected: Counter = Counter()
        kinds: Counter = Counter()
        shards, images, read, written = [], 0, 0, 0
        for s in self.segments:
            rejected.update(s["counts"]["rejected"])
            read += s["counts"]["read"]
            written += s["counts"]["written"]
            for smp in s["samples"]:
                kinds[smp["kind"]] += 1
                images += smp["num_images"]
            if s["tar"]:
                shards.append(
                    {
                        "tar": s["tar"],
                        "dali_index": s["dali_index"],
                        "index": f"{s['shard']}.index.json",
                        "num_samples": s["counts"]["written"],
                        "tar_bytes": s["tar_bytes"],
                    }
                )
        return {
            "partition": self.a.partition_index,
            "num_partitions": self.a.num_partitions,
            "settings_fingerprint": self.fp,
            "settings": settings,
            "tokenizer": tok,
            "counts": {
                "read": read,
                "written": written,
                "rejected": dict(sorted(rejected.items())),
            },
            "num_images": images,
            "kinds": dict(kinds),
            "shards": shards,
            "resumed_segments": self.state.num_resumed,
            "this_run": {
                "read": self.read_now,
                "written": self.written_now,
                "elapsed_s": elapsed,
                "samples_per_s": self.read_now / max(elapsed, 1e-9),
                "num_workers": self.a.num_workers,
            },
        }


if __name__ == "__main__":
    raise SystemExit(main())
