"""Assembling one partition: results in input order -> segments -> shards written by workers.

The parent process decides, in input order, everything that depends on order (dedup, which
shard a sample goes to and its key, when a shard is full by samples or bytes, the accounting);
that is cheap, and it never touches image bytes: workers spool them (worker.py) and a finished
segment is handed to a worker as a task (`shards.write_segment`) that writes the tar, the DALI
index, its columns piece and, last, its index.json (the commit). So decoding and writing both
scale with the workers; the parent only coordinates. Segments may commit out of order; a resumed
run keeps the committed prefix and redoes the rest (resume.py), so the output is the same.
Spool files are deleted once every segment that reads them has committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import time
from collections import Counter
from typing import Optional

from data_tools import FORMAT_VERSION
from data_tools.parallel import WorkerPool, result_of
from data_tools.shards import (
    Segment,
    SegmentTask,
    ShardWriter,
    SpoolRef,
    sample_entry,
    sample_key,
    spool_dir,
    write_segment,
)
from data_tools.worker import Result
from megatron_navil.data.limits import implausible_tokens

_TAR_END = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this


def oversized(json_member: bytes, text_tokens: Optional[int], limit: int):
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


class Job:
    """Assembles results (in input order) into segments; hands finished segments to the
    workers to write; holds the accounting."""

    def __init__(self, a: argparse.Namespace, fingerprint: str, state, pool: WorkerPool):
        self.a, self.fp, self.state, self.pool = a, fingerprint, state, pool
        self.segments: list[dict] = state.segments  # committed index.json contents, in order
        self.seen: dict[str, str] = state.seen_digests
        self.next_segment = len(self.segments)
        self.next_ordinal = state.records_done
        self.seg: Optional[Segment] = None
        self.members: list[list] = []  # per sample of the open segment: (name, bytes | SpoolRef)
        self.nbytes = 0  # tar bytes of the open segment so far (headers + padded data)
        self.spools: set[str] = set()  # spool files the open segment reads
        self.pending: dict[int, tuple] = {}  # segment -> (future, its spool files)
        self.done: dict[int, dict] = {}  # segment -> its committed index.json content
        self.refs: Counter = Counter()  # spool file -> pending segments reading it
        self.consumed: set[str] = set()  # spool files whose chunk was fully assembled
        self.written = sum(s["counts"]["written"] for s in self.segments)
        self.rejected_now = self.read_now = self.written_now = 0
        self.cpu0 = time.process_time()  # the parent's own CPU time (the benchmark reports it)

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
            r.reason, r.detail = oversized(members[-1][1], r.text_tokens, self.a.max_json_bytes)
        if r.reason is not None:
            seg.read += 1
            seg.rejected[r.reason] = seg.rejected.get(r.reason, 0) + 1
            seg.rejected_samples.append(
                {"source": r.source, "reason": r.reason, "detail": r.detail}
            )
            self.rejected_now += 1
            return
        size = ShardWriter.sample_bytes(members)
        if seg.samples and self.nbytes + size + _TAR_END > self.a.max_shard_bytes:
            self.close_segment(r.ordinal)  # this sample starts the next shard
            seg = self._open(r.ordinal)
            key = sample_key(seg.stem, 0)
            members, meta = sample_entry(key, r)
        self.nbytes += size
        self.members.append(members)
        self.spools.update(d.path for _, d in members if isinstance(d, SpoolRef))
        seg.read += 1
        seg.samples.append(meta)  # its "members" offsets are filled in by the writing worker
        self.written += 1
        self.written_now += 1
        if self.a.dedup:
            self.seen[r.digest] = key
        if len(seg.samples) >= self.a.samples_per_shard:
            self.close_segment(r.ordinal + 1)

    def close_segment(self, records_end: int) -> None:
        """Hand the open segment to a worker (tar, .idx, piece, then index.json: its commit)."""
        seg = self.seg
        if seg is None:
            return
        seg.records_end = records_end
        task = SegmentTask(self.a.output, FORMAT_VERSION, seg, self.members)
        self.pending[seg.segment] = (self.pool.submit(write_segment, task), self.spools)
        self.refs.update(self.spools)
        self.seg, self.members, self.nbytes, self.spools = None, [], 0, set()
        self.next_segment += 1

    def chunk_done(self, spool: Optional[str]) -> None:
        """All results of the chunk that wrote `spool` are assembled."""
        if spool is not None:
            self.consumed.add(spool)
            self._drop_unused(spool)
        self.reap(block=False)

    def reap(self, block: bool) -> None:
        """Collect written segments (all of them with `block`); a failed write raises here."""
        for j in sorted(self.pending):
            future, spools = self.pending[j]
            if not block and not future.done():
                continue
            self.done[j] = result_of(future)
            del self.pending[j]
            for p in spools:
                self.refs[p] -= 1
                self._drop_unused(p)

    def _drop_unused(self, spool: str) -> None:
        if spool in self.consumed and self.refs[spool] <= 0 and spool not in self.spools:
            self.consumed.discard(spool)
            del self.refs[spool]
            if os.path.exists(spool):
                os.remove(spool)

    def finish(self) -> None:
        """Close the last segment, wait for every write, drop the spool directory."""
        self.close_segment(self.next_ordinal)
        self.reap(block=True)
        self.segments += [self.done[j] for j in sorted(self.done)]
        shutil.rmtree(spool_dir(self.a.output, self.a.partition_index), ignore_errors=True)

    def abort(self) -> None:
        """Stop handing out writes (an error or a signal): unfinished segments are redone by
        the next run, which also removes their files and the spool directory."""
        for future, _ in self.pending.values():
            future.cancel()
        self.seg, self.members = None, []

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
                "parent_cpu_s": time.process_time() - self.cpu0,
            },
        }
