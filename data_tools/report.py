"""Accounting: per-partition reports and the merged report.json / rejected.jsonl / manifest.json.

Each partition writes `partitions/p{i:05d}.json` (+ `.rejected.jsonl`) when it finishes, summed
from ALL its committed segments (those resumed from an earlier run included), so the numbers are
exact across kills and resumes. Whichever partition finishes last sees all K reports and writes
the merged files (an idempotent, atomic write: two partitions finishing together write the same
bytes). A loader treats the dataset as complete once manifest.json exists.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Optional

from data_tools import FORMAT_VERSION
from data_tools.cli_common import UsageError, format_table
from megatron_navil.utils.files import atomic_writer, write_json_atomic, write_text_atomic

PARTITIONS_DIR = "partitions"


def partition_report_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, PARTITIONS_DIR, f"p{index:05d}.json")


def write_partition_report(
    out_dir: str, index: int, report: dict[str, Any], rejected_rows: list[dict[str, Any]]
) -> None:
    os.makedirs(os.path.join(out_dir, PARTITIONS_DIR), exist_ok=True)
    base = partition_report_path(out_dir, index)
    write_text_atomic(
        f"{base[:-5]}.rejected.jsonl",
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rejected_rows),
    )
    write_json_atomic(base, report, indent=1)


def try_merge(out_dir: str, num_partitions: int) -> Optional[dict[str, Any]]:
    """Write report.json, rejected.jsonl and manifest.json if all partitions are finished."""
    reports = []
    for i in range(num_partitions):
        p = partition_report_path(out_dir, i)
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            reports.append(json.load(f))
    prints = {r["settings_fingerprint"] for r in reports}
    if len(prints) != 1:
        raise UsageError(
            f"{out_dir}: partitions were made with different settings "
            f"({len(prints)} fingerprints); re-run them with the same flags"
        )
    rejected: Counter = Counter()
    for r in reports:
        rejected.update(r["counts"]["rejected"])
    read = sum(r["counts"]["read"] for r in reports)
    written = sum(r["counts"]["written"] for r in reports)
    assert read == written + sum(rejected.values()), "accounting does not add up"
    shards = [s for r in reports for s in r["shards"]]
    report = {
        "read": read,
        "written": written,
        "rejected": dict(sorted(rejected.items())),
        "num_partitions": num_partitions,
        "num_shards": len(shards),
        "num_images": sum(r["num_images"] for r in reports),
        "kinds": dict(sum((Counter(r["kinds"]) for r in reports), Counter())),
        "settings_fingerprint": reports[0]["settings_fingerprint"],
    }
    with atomic_writer(os.path.join(out_dir, "rejected.jsonl")) as out:
        for i in range(num_partitions):
            with open(
                partition_report_path(out_dir, i)[:-5] + ".rejected.jsonl", encoding="utf-8"
            ) as f:
                out.write(f.read())
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "navil-preprocess",
        "num_samples": written,
        "num_shards": len(shards),
        "num_partitions": num_partitions,
        "settings": reports[0]["settings"],
        "tokenizer": reports[0]["tokenizer"],
        "shards": shards,
    }
    write_json_atomic(os.path.join(out_dir, "report.json"), report, indent=1)
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest, indent=1)
    return report


def summary_text(part: dict[str, Any], merged: Optional[dict[str, Any]], out_dir: str) -> str:
    """One screen: this partition's accounting, this run's speed, and where the results are."""
    c, run = part["counts"], part["this_run"]
    rows = [["read", c["read"]], ["written", c["written"]]]
    rows += [[f"rejected: {k}", v] for k, v in sorted(c["rejected"].items())]
    rows += [
        ["shards", len(part["shards"])],
        ["images", part["num_images"]],
        ["segments resumed", part["resumed_segments"]],
        ["this run: records", run["read"]],
        ["this run: samples/s", f"{run['samples_per_s']:.1f}"],
        ["this run: seconds", f"{run['elapsed_s']:.1f}"],
    ]
    head = f"partition {part['partition']} of {part['num_partitions']}"
    text = format_table(rows, [head, "count"])
    if merged is not None:
        text += (
            f"\nall partitions done: {merged['written']} samples in {merged['num_shards']} "
            f"shards; see {os.path.join(out_dir, 'report.json')}, manifest.json, "
            "rejected.jsonl"
        )
    else:
        text += (
            "\nother partitions still running: report.json and manifest.json are written "
            "by the last one to finish"
        )
    return text
