"""The shards stay plain WebDataset: other readers get exactly our samples.

Proves: the `webdataset` package's reader iterates an output of navil-preprocess (images of
every stored format, multi-image and text-only samples) and yields, in manifest order, exactly
the samples of our index with every member's bytes equal to those at the index's offsets; and
after `navil-preprocess --energon DIR` (Energon's own `energon prepare`, non-interactive),
Megatron-Energon reads the same samples with the same member bytes. If this fails, see
data_tools/shards.py (tar layout, member names) and data_tools/energon.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest


def _ours(root: str) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes} read at the offsets of our JSON index (manifest order)."""
    with open(os.path.join(root, "manifest.json")) as f:
        shards = json.load(f)["shards"]
    out = {}
    for sh in shards:
        with open(os.path.join(root, sh["index"])) as f:
            samples = json.load(f)["samples"]
        with open(os.path.join(root, sh["tar"]), "rb") as tar:
            for s in samples:
                parts = {}
                for suffix, (off, size) in s["members"].items():
                    tar.seek(off)
                    parts[suffix] = tar.read(size)
                out[s["key"]] = parts
    return out


def test_webdataset_reads_the_same_samples(reference_run):
    import webdataset as wds

    with open(os.path.join(reference_run, "manifest.json")) as f:
        tars = [os.path.join(reference_run, s["tar"]) for s in json.load(f)["shards"]]
    ours = _ours(reference_run)
    kinds = {json.loads(p["json"])["kind"] for p in ours.values()}
    assert {"caption", "conversation", "interleaved", "text"} <= kinds
    assert any("0.jpg" in p or "0.png" in p for p in ours.values())  # multi-image samples
    got = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        parts = {k: v for k, v in sample.items() if not k.startswith("__")}
        got[sample["__key__"]] = parts
    assert list(got) == list(ours)
    assert got == ours


@pytest.mark.processes
def test_energon_reads_the_same_samples(reference_run, tmp_path):
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        Sample,
        WorkerConfig,
        basic_sample_keys,
        get_loader,
        get_val_dataset,
        stateless,
    )

    from data_tools.preprocess import main

    root = str(tmp_path / "energon")
    shutil.copytree(reference_run, root)
    assert main(["--energon", root, "--num-workers", "1"]) == 0
    assert os.path.isfile(os.path.join(root, ".nv-meta", "dataset.yaml"))

    @dataclasses.dataclass
    class Raw(Sample):
        parts: dict

    @stateless
    def cook(s: dict) -> Raw:
        return Raw(**basic_sample_keys(s), parts={k: v for k, v in s.items() if "__" not in k})

    class Encoder(DefaultTaskEncoder):
        cookers = [Cooker(cook)]
        decoder = None  # the members' bytes as stored

        def batch(self, samples):
            return samples

    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = get_val_dataset(
        root, split_part="train", worker_config=wc, batch_size=1, task_encoder=Encoder()
    )
    got = {}
    for (sample,) in get_loader(ds):
        got[sample.__key__] = sample.parts
    assert got == _ours(root)
