"""Cross-partition dedup (navil-dedup, data_tools/dedup.py) and the loader skipping its marks.

Proves: on an output of two partitions whose inputs repeat samples within and across the
partitions, navil-dedup run as three separate bucket jobs (in any order; the last merges)
marks exactly the later copies an independent pass over the JSON indexes finds (first copy in
manifest order kept), the same bytes as one process doing every bucket; report.json counts
them; the shards are untouched; the training loader never yields a marked sample and counts
the skips; a rebuilt index (--reindex) drops the marks of the old build (the loader then yields
the copies again until navil-dedup runs again). If this fails, see data_tools/dedup.py and
megatron_navil/data/index.py (_duplicates).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from tests.data.corpus import all_index_samples, epochs, reindex, sentence


def _preprocess(root: str, tok_dir: str, records: list[dict], partitions: int) -> str:
    from data_tools.preprocess import main

    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(root, "shards")
    for i in range(partitions):
        args = ["--input", data, "--output", out, "--tokenizer", tok_dir, "--num-workers", "0"]
        args += ["--samples-per-shard", "5", "--log-every", "1000"]
        args += ["--num-partitions", str(partitions), "--partition-index", str(i)]
        assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def dup_output(tmp_path_factory, tok_dir):
    # 40 texts, 13 distinct: copies inside each half and across the two partitions
    records = [{"text": sentence(k % 13, 5 + k % 13)} for k in range(40)]
    return _preprocess(str(tmp_path_factory.mktemp("dups")), tok_dir, records, 2)


def _later_copies(root: str) -> list[int]:
    seen, later = set(), []
    for i, s in enumerate(all_index_samples(root)):  # manifest order = sample numbers
        if s["digest"] in seen:
            later.append(i)
        seen.add(s["digest"])
    return later


def _tar_hashes(root: str) -> dict:
    return {
        n: hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
        for n in os.listdir(root)
        if n.endswith(".tar")
    }


def test_bucket_jobs_mark_exactly_the_later_copies(dup_output, tmp_path):
    from data_tools.dedup import main

    root = str(tmp_path / "buckets")
    shutil.copytree(dup_output, root)
    tars = _tar_hashes(root)
    want = _later_copies(root)
    assert len(want) == 40 - 13
    for b in (2, 0, 1):
        assert not os.path.exists(os.path.join(root, "index", "dedup.json"))
        assert main([root, "--num-buckets", "3", "--bucket-index", str(b)]) == 0
    marks = np.fromfile(os.path.join(root, "index", "duplicate.bin"), np.uint8)
    assert np.nonzero(marks)[0].tolist() == want
    with open(os.path.join(root, "report.json")) as f:
        assert json.load(f)["duplicates_marked"] == len(want)
    assert _tar_hashes(root) == tars  # nothing rewritten

    single = str(tmp_path / "single")
    shutil.copytree(dup_output, single)
    assert main([single]) == 0
    one = np.fromfile(os.path.join(single, "index", "duplicate.bin"), np.uint8)
    assert np.array_equal(one, marks)


def test_loader_skips_marked_samples(dup_output, tmp_path, make_loader, navil_logs):
    from data_tools.dedup import main

    root = str(tmp_path / "skip")
    shutil.copytree(dup_output, root)
    keys = [s["key"] for s in all_index_samples(root)]
    dups = {keys[i] for i in _later_copies(root)}
    assert main([root, "--num-buckets", "2"]) == 0
    batches, counters = epochs(make_loader([root], seq_length=128), 1)
    seen = [k for b in batches for k in b.metadata["keys"]]
    assert not set(seen) & dups and len(seen) == len(set(seen))
    assert counters["skipped_samples"] == len(dups)
    warned = [r.getMessage() for r in navil_logs.records if r.levelname == "WARNING"]
    assert not any("duplicate" in w for w in warned)  # counted, not warned about

    reindex(root)  # a new build: the old marks no longer apply
    batches, counters = epochs(make_loader([root], seq_length=128), 1)
    assert set(dups) <= {k for b in batches for k in b.metadata["keys"]}
    assert not os.path.exists(os.path.join(root, "index", "dedup.json"))
