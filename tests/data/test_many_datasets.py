"""Hundreds of datasets at once: `--data-path` with 300 directories and weights stays cheap.

Proves: 300 tiny navil-preprocess outputs given as Megatron-LM's weighted blend syntax open in
bounded time and memory (each is one small meta.json and one mapping, no per-sample objects),
hold a bounded number of file descriptors (one mapping per dataset; tar files through one shared
cache of 64), draw samples from many of them in the weighted proportions, and a dataset whose
shard is missing is refused in one line naming its manifest and the file, whichever of the 300
it is. If this fails, see megatron_navil/data/index.py (load_dataset, _check_shards),
binindex.py (one mapping per dataset) and builder.Datasets (the shared file cache).
"""

from __future__ import annotations

import os
import resource
import shutil
import time

import numpy as np
import pytest

from megatron_navil.config.data import parse_data_path
from megatron_navil.data.index import DataError
from megatron_navil.data.order import EpochOrder
from tests.data.corpus import preprocess, sentence

NUM = 300


@pytest.fixture(scope="module")
def many(tmp_path_factory, tok_dir):
    """One tiny text-only output, copied NUM times (each copy a complete dataset)."""
    base = str(tmp_path_factory.mktemp("many"))
    src = preprocess(
        os.path.join(base, "src"), [{"text": sentence(k, 4 + k % 5)} for k in range(6)], tok_dir
    ).root
    roots = []
    for d in range(NUM):
        roots.append(os.path.join(base, f"d{d:03d}"))
        shutil.copytree(src, roots[-1])
    return roots


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_300_weighted_datasets_open_cheaply(many, make_loader):
    words = [w for d, r in enumerate(many) for w in (str(1 + d % 3), r)]
    spec = parse_data_path(words)
    assert len(spec["train_paths"]) == NUM and spec["train_weights"][:3] == (1.0, 2.0, 3.0)
    fds, rss, t0 = _fds(), _rss_mb(), time.perf_counter()
    loader = make_loader(spec["train_paths"], train_weights=spec["train_weights"], prefetch_depth=0)
    opened = time.perf_counter() - t0
    # generous bounds for a shared 2-core machine: ~10 ms and ~50 KB per tiny dataset here
    assert opened < 30, opened
    assert _rss_mb() - rss < 200
    assert _fds() - fds <= NUM + 16  # one mapping per dataset, no tar opened yet
    keys = []
    for _ in range(6):
        b = next(loader)
        keys += b.metadata["keys"]
    assert _fds() - fds <= NUM + 64 + 16  # tars through the one shared cache
    # where the drawn samples came from: weights 1:2:3 by dataset index mod 3
    costs = loader.builder.costs
    sizes = np.diff(costs.offsets)
    assert (sizes == 6).all() and len(costs) == 6 * NUM
    order = EpochOrder(sizes, spec["train_weights"], None, 1234, 0, True)
    owner = costs.locate(order.window(0, len(order)))
    per_class = np.bincount(owner % 3, minlength=3)
    assert np.allclose(per_class / per_class.sum(), [1 / 6, 2 / 6, 3 / 6], atol=0.01)
    sources = {int(d) for d in owner[:200]}
    assert len(sources) > 50  # the blend is mixed, not dataset after dataset
    assert len(keys) > 6


def test_a_missing_shard_in_one_of_300_is_named(many, make_loader, tmp_path):
    roots = list(many)
    broken = str(tmp_path / "broken")
    shutil.copytree(roots[137], broken)
    tar = next(os.path.join(broken, n) for n in sorted(os.listdir(broken)) if n.endswith(".tar"))
    os.remove(tar)
    roots[137] = broken
    with pytest.raises(DataError) as e:
        make_loader(roots)
    msg = str(e.value)
    assert os.path.join(broken, "manifest.json") in msg and tar in msg and "\n" not in msg
