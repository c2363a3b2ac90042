"""Partitioning is deterministic: K partitions together equal one single run, with no overlap.

Proves: (1) the byte-range enumeration assigns every JSONL line (with correct 1-based line
numbers) to exactly one partition for many K, including lines split across partition
boundaries; (2) running navil-preprocess as K=3 partitions into one directory writes exactly the
samples (same sources, same image bytes) and the same accounting as one run, with distinct shard
names, and the last partition to finish writes the merged report.json/manifest.json.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from data_tools.inputs import discover, iter_records, partition_bounds
from data_tools.preprocess import main
from tests.data_tools.conftest import preprocess_args
from tests.data_tools.corpus import source_id


def test_byte_ranges_cover_every_line_once(tmp_path):
    rng = random.Random(0)
    paths = []
    for f in range(3):
        p = tmp_path / f"part{f}.jsonl"
        lines = [json.dumps({"text": "x" * rng.randint(0, 300)}) for _ in range(rng.randint(0, 40))]
        p.write_text("".join(ln + "\n" for ln in lines) + ("\n" if f == 1 else ""))
        paths.append(str(p))
    _, files = discover([str(tmp_path / "*.jsonl")])
    total = sum(f.size for f in files)
    everything = [
        (r.source["file"], r.source["line"], r.line) for r in iter_records(files, 0, total, None)
    ]
    # Independent reference: read the files plainly.
    ref = [
        (os.path.basename(p), k + 1, ln.strip())
        for p in paths
        for k, ln in enumerate(open(p).read().split("\n")[:-1])
        if ln.strip()
    ]
    assert everything == ref
    for k in (2, 3, 5, 7, 64):
        parts = [
            [
                (r.source["file"], r.source["line"], r.line)
                for r in iter_records(files, *partition_bounds(total, k, i), None)
            ]
            for i in range(k)
        ]
        assert [x for p in parts for x in p] == ref, k  # in order, no gap, no overlap


@pytest.fixture(scope="module")
def partitioned(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parts"))
    outs = []
    for i in (2, 0, 1):  # any order: the last one to finish merges
        assert (
            main(
                preprocess_args(
                    corpus,
                    out,
                    "--dedup",
                    "--num-workers",
                    "0",
                    "--num-partitions",
                    "3",
                    "--partition-index",
                    str(i),
                )
            )
            == 0
        )
        outs.append(os.path.exists(os.path.join(out, "manifest.json")))
    assert outs == [False, False, True]
    return out


def _written(out):
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    res = {}
    for sh in man["shards"]:
        with open(os.path.join(out, sh["index"])) as f:
            idx = json.load(f)
        blob = open(os.path.join(out, sh["tar"]), "rb").read()
        for s in idx["samples"]:
            images = tuple(
                blob[o : o + n] for m, (o, n) in sorted(s["members"].items()) if m != "json"
            )
            res[source_id(s["source"])] = (s["kind"], s["text_tokens"], images)
    return man, res


def test_union_of_partitions_equals_single_run(partitioned, reference_run):
    man_p, got = _written(partitioned)
    man_1, ref = _written(reference_run)
    assert got == ref
    assert man_p["num_samples"] == man_1["num_samples"]
    names = [s["tar"] for s in man_p["shards"]]
    assert len(set(names)) == len(names)
    assert {n.split("-")[1] for n in names} <= {"p00000", "p00001", "p00002"}
    reads = [
        json.load(open(os.path.join(partitioned, "partitions", f"p{i:05d}.json")))["counts"]["read"]
        for i in range(3)
    ]
    assert all(r > 0 for r in reads)  # the byte ranges really split this corpus three ways


def test_partitioned_accounting_equals_single_run(partitioned, reference_run, corpus):
    rep_p = json.load(open(os.path.join(partitioned, "report.json")))
    rep_1 = json.load(open(os.path.join(reference_run, "report.json")))
    for k in ("read", "written", "rejected"):
        assert rep_p[k] == rep_1[k]
    rej_p = sorted(open(os.path.join(partitioned, "rejected.jsonl")).read().splitlines())
    rej_1 = sorted(open(os.path.join(reference_run, "rejected.jsonl")).read().splitlines())
    assert rej_p == rej_1


def test_partition_flags_are_checked(corpus, tmp_path, capsys):
    rc = main(
        preprocess_args(corpus, str(tmp_path), "--num-partitions", "3", "--partition-index", "3")
    )
    assert rc == 2
    assert "--partition-index 3 must be in 0..2" in capsys.readouterr().err
