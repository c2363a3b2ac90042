"""Resume: find this partition's committed segments, check settings, clean up leftovers.

A segment is committed iff `shard-p{i}-{j}.index.json` exists (written last, atomically). On a
re-run we load segments j = 0, 1, ... while they exist and their tar is whole, skip the input
records they consumed, and delete everything else this partition left behind (`*.tmp*` files,
a tar or .idx without its .index.json). Settings must match exactly: a shard layout made with
other flags cannot be continued, so that is a user error naming what to do.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from data_tools.cli_common import UsageError
from data_tools.report import PARTITIONS_DIR
from data_tools.shards import load_segment, shard_stem, spool_dir
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class ResumeState:
    """What earlier runs of this partition finished."""

    segments: list[dict[str, Any]] = field(default_factory=list)
    """Committed segment indexes, in order."""
    records_done: int = 0
    """Input records those segments consumed (skipped on this run)."""
    seen_digests: dict[str, str] = field(default_factory=dict)
    """Content digest -> key of the samples already written (for --dedup)."""
    num_resumed: int = 0
    """How many segments were found committed."""


def load_finished(out_dir: str, partition: int, fingerprint: str) -> ResumeState:
    _check_other_partitions(out_dir, fingerprint)
    state = ResumeState()
    j = 0
    while True:
        stem = shard_stem(partition, j)
        path = os.path.join(out_dir, f"{stem}.index.json")
        if not os.path.isfile(path):
            break
        seg = load_segment(path)
        if seg.get("settings_fingerprint") != fingerprint:
            raise UsageError(
                f"{out_dir} holds shards made with different settings (e.g. other flags, "
                "inputs or tokenizer); use a new --output, or re-run with the original flags"
            )
        if seg["tar"] and _tar_size(out_dir, seg["tar"]) != seg["tar_bytes"]:
            logger.warning("%s: tar size differs from its index; redoing from this segment", stem)
            break
        state.segments.append(seg)
        state.records_done = seg["records"][1]
        for s in seg["samples"]:
            state.seen_digests.setdefault(s["digest"], s["key"])
        j += 1
    state.num_resumed = j
    _remove_leftovers(out_dir, partition, j)
    if j:
        logger.info(
            "resuming partition %d: %d segments done, skipping %d input records",
            partition,
            j,
            state.records_done,
        )
    return state


def _tar_size(out_dir: str, name: str) -> int:
    try:
        return os.path.getsize(os.path.join(out_dir, name))
    except OSError:
        return -1


def _remove_leftovers(out_dir: str, partition: int, first_unfinished: int) -> None:
    """Delete this partition's files from segment `first_unfinished` on, and temp files."""
    prefix = f"shard-p{partition:05d}-"
    removed = 0
    for path in glob.glob(os.path.join(out_dir, prefix + "*")):
        name = os.path.basename(path)
        seg = int(name[len(prefix) : len(prefix) + 6])
        if seg >= first_unfinished or ".tmp" in name:
            os.remove(path)
            removed += 1
    spools = spool_dir(out_dir, partition)  # image bytes a killed run had not written yet
    if os.path.isdir(spools):
        shutil.rmtree(spools)
    report = os.path.join(out_dir, PARTITIONS_DIR, f"p{partition:05d}.json")
    if os.path.exists(report):
        os.remove(report)  # rewritten when this run finishes
    if removed:
        logger.info("removed %d unfinished file(s) of partition %d", removed, partition)


def _check_other_partitions(out_dir: str, fingerprint: str) -> None:
    for path in glob.glob(os.path.join(out_dir, PARTITIONS_DIR, "p*.json")):
        with open(path, encoding="utf-8") as f:
            other = json.load(f).get("settings_fingerprint")
        if other != fingerprint:
            raise UsageError(
                f"{out_dir} was written with different settings ({os.path.basename(path)}: "
                "other flags, inputs, partition count or tokenizer); use a new --output, or "
                "re-run with the original flags"
            )
