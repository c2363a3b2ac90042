"""The validation loader and DataConfig.

Proves: the validation loader reads the held-out set in file order (no shuffle), every iter()
restarts it so each evaluation sees bit-identical batches, it cycles past the end of the set,
and DP ranks get equal counts of disjoint packs; DataConfig documents every field (the CLI/YAML
help is generated from these docstrings; docs/data_loader.md has a row for each), round-trips
through dicts, and rejects settings that cannot work with a message naming the field;
`pad_multiple_for` is lcm(the FP8 recipe's row multiple, TP if SP). The fields that moved out of
DataConfig (seq_length, seed, pad_multiple, min/max_dynamic_patch) are tested in
tests/config/test_one_home.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest

from megatron_navil.config.base import ConfigError, field_docs
from megatron_navil.config.data import DataConfig
from megatron_navil.config.parallel import pad_multiple_for
from tests.data.corpus import all_index_samples
from tests.data.test_resume import assert_same_batch, assert_same_tensors


def test_valid_loader_is_the_same_every_time(dataset, make_loader):
    valid = make_loader([dataset.root], valid=True)
    first = list(itertools.islice(valid, 5))
    next(valid)  # a partly consumed evaluation does not shift the next one
    second = list(itertools.islice(valid, 5))
    for a, b in zip(first, second):
        assert_same_batch(a, b)
    file_order = [s["key"] for s in all_index_samples(dataset.root)]
    assert first[0].metadata["keys"][0] == file_order[0]
    many = list(itertools.islice(valid, 40))  # more than the held-out set: it cycles
    assert many[-1].metadata["epoch"] >= 1
    n = sum(b.metadata["epoch"] == 0 for b in many)
    assert_same_tensors(many[n], many[0])  # the next cycle repeats the set in the same order
    assert many[n].metadata["keys"] == many[0].metadata["keys"]


def test_valid_loader_dp_ranks(dataset, make_loader):
    ranks = [make_loader([dataset.root], valid=True, dp_rank=r, dp_size=2) for r in range(2)]
    packs = []
    for loader in ranks:
        got = [b for b in itertools.islice(loader, 30) if b.metadata["epoch"] == 0]
        packs.append([b.metadata["global_pack"] for b in got])
    assert len(packs[0]) == len(packs[1]) > 0
    assert not set(packs[0]) & set(packs[1])


def test_every_field_documented_and_round_trip():
    docs = field_docs(DataConfig)
    missing = [f.name for f in dataclasses.fields(DataConfig) if not docs.get(f.name)]
    assert not missing
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "data_loader.md")) as f:
        page = f.read()
    assert not [f.name for f in dataclasses.fields(DataConfig) if f"| `{f.name}` |" not in page]
    cfg = DataConfig(train_paths=("a", "b"), train_weights=(1.0, 3.0), multiscale=True)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.apply_overrides({"max_images_per_pack": "8"}).max_images_per_pack == 8


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(train_paths=("a",), train_weights=(1.0, 2.0)), "train_weights"),
        (dict(train_paths=("a",), train_weights=(0.0,)), "train_weights"),
        (dict(max_images_per_pack=0), "max_images_per_pack"),
        (dict(prefetch_depth=-1), "prefetch_depth"),
    ],
)
def test_bad_settings_are_refused(kw, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kw).validate()
    with pytest.raises(ConfigError, match="overlong_policy"):
        DataConfig.from_dict({"overlong_policy": "crop"})


def test_pad_multiple_for():
    assert pad_multiple_for() == 1
    assert pad_multiple_for(fp8_row_multiple=16) == 16
    assert pad_multiple_for(fp8_row_multiple=32) == 32  # MXFP8
    assert pad_multiple_for(4, sequence_parallel=True) == 4
    assert pad_multiple_for(8, sequence_parallel=True, fp8_row_multiple=16) == 16
    assert pad_multiple_for(3, sequence_parallel=True, fp8_row_multiple=16) == 48
