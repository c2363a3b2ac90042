"""Exact resume, data-parallel dealing and DP-size remapping of the real loader.

Proves: a fresh loader restored from `state_dict()` taken after k batches yields batches
bit-identical (every tensor, torch.equal) to batches k+1.. of an uninterrupted loader, with the
background prefetcher running ahead in both, across chunk and epoch boundaries and exactly at a
planner window's edge; the state is a
JSON-able dict and counters continue; DP ranks see disjoint packs in equal numbers whose union is
the single-rank epoch minus a tail shorter than dp_size; a state restored at another DP size
continues with the first pack the old world had not reached (nothing repeated, nothing lost);
a state from other data settings is refused with a message.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_navil.data.state import LoaderStateError
from tests.data.corpus import epochs

FIELDS = (
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "cu_seqlens",
    "pixel_values",
    "grid_thw",
    "modality_mask",
)


def assert_same_batch(a, b):
    assert_same_tensors(a, b)
    assert a.metadata == b.metadata


def assert_same_tensors(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f


def test_restore_yields_identical_batches(dataset, make_loader):
    ref = make_loader([dataset.root], prefetch_depth=2)
    batches, states = [], []
    for _ in range(22):  # > 1 epoch (about 9 packs each), several planner chunks
        batches.append(next(ref))
        states.append(json.loads(json.dumps(ref.state_dict())))
    assert batches[-1].metadata["epoch"] >= 2
    boundary = next(i for i, b in enumerate(batches) if b.metadata["epoch"] == 1) - 1
    for k in (0, 4, boundary, boundary + 1):
        resumed = make_loader([dataset.root], prefetch_depth=2)
        resumed.load_state_dict(states[k])
        for i in range(k + 1, len(batches)):
            assert_same_batch(next(resumed), batches[i])
            assert resumed.state_dict() == states[i]
        resumed.close()
    # restoring the running loader itself (its prefetcher is ahead) rewinds it exactly
    ref.load_state_dict(states[6])
    assert_same_batch(next(ref), batches[7])
    assert ref.counters == states[7]["counters"]


def test_restore_at_a_window_boundary(dataset, make_loader):
    """States taken at the last pack of a planner window (chunk) and at the first pack of the
    next one restore exactly: the restored loader plans from its window, not the epoch start."""
    ref = make_loader([dataset.root], prefetch_depth=1, plan_chunk_samples=8)
    batches, states = [], []
    for _ in range(14):
        batches.append(next(ref))
        states.append(json.loads(json.dumps(ref.state_dict())))
    chunks = [s["chunk"] for s in states]
    edges = [k for k in range(len(states) - 1) if chunks[k + 1] != chunks[k]]
    assert len(edges) >= 2, chunks  # several windows are crossed
    for k in (edges[0], edges[0] + 1, edges[-1]):
        resumed = make_loader([dataset.root], prefetch_depth=1, plan_chunk_samples=8)
        resumed.load_state_dict(states[k])
        for i in range(k + 1, len(batches)):
            assert_same_batch(next(resumed), batches[i])
            assert resumed.state_dict() == states[i]


def test_synchronous_and_prefetching_loaders_agree(dataset, make_loader):
    a, b = (
        make_loader([dataset.root], prefetch_depth=0),
        make_loader([dataset.root], prefetch_depth=3),
    )
    for _ in range(12):
        assert_same_batch(next(a), next(b))


def _epoch_packs(loader):
    batches, _ = epochs(loader, 1)
    return {b.metadata["global_pack"]: b.metadata["keys"] for b in batches}


def test_dp_ranks_disjoint_equal_and_complete(dataset, make_loader):
    single = _epoch_packs(make_loader([dataset.root]))
    dp = 2
    ranks = [_epoch_packs(make_loader([dataset.root], dp_rank=r, dp_size=dp)) for r in range(dp)]
    assert len({len(r) for r in ranks}) == 1
    for r, packs in enumerate(ranks):
        for g, keys in packs.items():
            assert g % dp == r and keys == single[g]  # same global plan, dealt round-robin
    keys = [k for packs in ranks for ks in packs.values() for k in ks]
    assert len(keys) == len(set(keys))  # disjoint samples
    assert len(single) - dp < sum(len(r) for r in ranks) <= len(single)


def test_restore_at_other_dp_size_remaps(dataset, make_loader):
    single = _epoch_packs(make_loader([dataset.root]))
    old = [make_loader([dataset.root], dp_rank=r, dp_size=2) for r in range(2)]
    consumed = {next(o).metadata["global_pack"] for o in old for _ in range(2)}
    assert consumed == {0, 1, 2, 3}
    state = old[0].state_dict()
    new = [make_loader([dataset.root], dp_rank=r, dp_size=3) for r in range(3)]
    got = []
    for r, loader in enumerate(new):
        loader.load_state_dict(state)
        mine = []
        while (b := next(loader)).metadata["epoch"] == 0:
            assert b.metadata["keys"] == single[b.metadata["global_pack"]]
            mine.append(b.metadata["global_pack"])
        assert all((g - 4) % 3 == r for g in mine)
        got.append(mine)
    assert len({len(m) for m in got}) == 1
    flat = sorted(g for m in got for g in m)
    assert flat == list(range(4, 4 + len(flat)))  # resumes at the first unseen pack, no gaps
    assert len(single) - 3 < 4 + len(flat) <= len(single)


def test_state_from_other_settings_is_refused(dataset, make_loader):
    state = make_loader([dataset.root], seq_length=256).state_dict()
    other = make_loader([dataset.root], seq_length=512)
    with pytest.raises(LoaderStateError, match="other data or plan settings"):
        other.load_state_dict(state)
    with pytest.raises(LoaderStateError, match="not a data loader state"):
        other.load_state_dict({"epoch": 3})
