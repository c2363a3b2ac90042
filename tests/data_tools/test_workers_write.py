"""Workers write the shards; the parent only coordinates (data_tools/assemble.py, worker.py).

Proves: a chunk's results carry references into the worker's spool file, never image bytes
(what crosses to the parent is small); every segment is handed to the pool as a write task
(`shards.write_segment`), none is written by the assembling code itself; and the output (tars,
DALI indexes, column pieces, index.json files, report, manifest, binary index) is byte-identical
whether 2 worker processes write it or the main process does (--num-workers 0), so who writes
does not change what is written. If this fails, see data_tools/assemble.py (Job) and
shards.write_segment.
"""

from __future__ import annotations

import filecmp
import os
import pickle

import pytest

from data_tools.preprocess import main
from tests.data_tools.conftest import preprocess_args


def test_results_carry_spool_references_not_bytes(corpus, tmp_path):
    from data_tools.images import ImageLimits
    from data_tools.inputs import discover, iter_records
    from data_tools.shards import SpoolRef
    from data_tools.worker import WorkerConfig, init_worker, process_chunk

    root, files = discover(corpus.inputs)
    records = list(iter_records(files, 0, sum(f.size for f in files), corpus.images, 1 << 20))[:8]
    init_worker(WorkerConfig(None, ImageLimits(16, 1_000_000)))
    spool = str(tmp_path / "chunk.bin")
    results = process_chunk((records, spool))
    images = [im for r in results if r.reason is None for im in r.images]
    assert images and all(isinstance(im.data, SpoolRef) for im in images)
    assert len(pickle.dumps(results)) < 20_000  # metadata only
    assert sum(im.data.size for im in images) == os.path.getsize(spool)
    assert all(len(im.data.read()) == im.data.size for im in images)


def test_every_segment_is_a_write_task(corpus, tmp_path, monkeypatch):
    import data_tools.parallel as parallel
    from data_tools.shards import write_segment

    submitted = []
    real = parallel.WorkerPool.submit

    def submit(self, fn, arg):
        submitted.append(fn)
        return real(self, fn, arg)

    monkeypatch.setattr(parallel.WorkerPool, "submit", submit)
    out = str(tmp_path / "out")
    assert main(preprocess_args(corpus, out, "--num-workers", "0")) == 0
    n_index = sum(n.endswith(".index.json") for n in os.listdir(out))
    assert submitted and all(fn is write_segment for fn in submitted)
    assert len(submitted) == n_index
    assert not os.path.exists(os.path.join(out, ".spool-p00000"))  # cleaned up


@pytest.mark.processes
def test_output_is_the_same_whoever_writes(corpus, tmp_path):
    a, b = str(tmp_path / "workers"), str(tmp_path / "inline")
    assert main(preprocess_args(corpus, a, "--num-workers", "2", "--dedup")) == 0
    assert main(preprocess_args(corpus, b, "--num-workers", "0", "--dedup")) == 0
    names = sorted(n for n in os.listdir(a) if n.startswith("shard-"))
    assert names == sorted(n for n in os.listdir(b) if n.startswith("shard-"))
    assert any(n.endswith(".cols.npy") for n in names)
    for n in names + ["report.json", "manifest.json", "rejected.jsonl"]:
        assert filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False), n
    for n in ("columns.bin",):  # the binary index too (meta.json differs only in build_id)
        assert filecmp.cmp(os.path.join(a, "index", n), os.path.join(b, "index", n), shallow=False)
