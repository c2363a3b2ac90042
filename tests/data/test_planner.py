"""The pack planner on synthetic costs (no files): budgets, completeness, blending, dealing.

Proves: packs never exceed seq_length tokens or the image cap and never split a sample; over an
epoch every sample is packed exactly once or skipped for a reason an independent rule predicts
(too many images, an image longer than the budget, over-long under `skip`); truncated samples
get packs of their own; blend quotas are exact; the order is a function of (seed, epoch) only;
DP ranks get disjoint packs in equal numbers (a multiple of micro-batches per step) whose union
is every pack but a tail shorter than one unit; a plan restarted from a chunk hint yields the
same packs; the windowed epoch order equals the whole order sliced, is a permutation per pass,
costs only its window at 10^12 samples and is pinned to fixed values; skips of a chunk that
yields no pack are not lost. All comparisons are exact (integers).
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_navil.data.planner import (
    SKIP_IMAGE_TOO_LONG,
    SKIP_OVERLONG,
    SKIP_TOO_MANY_IMAGES,
    EpochOrder,
    EpochPlan,
    GlobalCosts,
    PlanParams,
    epoch_order,
    pack_chunk,
)

SEQ, CAP = 512, 6


def _costs(n: int, seed: int = 0) -> GlobalCosts:
    rng = np.random.default_rng(seed)
    length = rng.integers(5, 300, n)
    length[rng.random(n) < 0.03] = rng.integers(SEQ + 1, 3 * SEQ, 1)  # some over-long
    length[rng.random(n) < 0.02] = SEQ  # some exactly full
    num_images = rng.integers(0, 4, n)
    num_images[rng.random(n) < 0.01] = CAP + 1
    max_img = np.where(num_images > 0, rng.integers(10, 120, n), 0)
    max_img[rng.random(n) < 0.01] = SEQ + 5  # one image larger than the whole budget
    return GlobalCosts(length.astype(np.int64), num_images.astype(np.int64), max_img)


def _expected_reason(c: GlobalCosts, sid: int, policy: str):
    if c.num_images[sid] > CAP:
        return SKIP_TOO_MANY_IMAGES
    if c.max_image_tokens[sid] > SEQ:
        return SKIP_IMAGE_TOO_LONG
    if c.length[sid] > SEQ and policy == "skip":
        return SKIP_OVERLONG
    return None


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_packs_respect_budget_and_lose_no_sample(policy):
    n = 3000
    c = _costs(n)
    p = PlanParams(SEQ, CAP, window=4, chunk=700, overlong_policy=policy)
    order = epoch_order([n], (), None, seed=3, epoch=0, shuffle=True)
    chunks = [order[i : i + p.chunk] for i in range(0, n, p.chunk)]
    packs = [pk for ids in chunks for pk in pack_chunk(ids, c.window(ids), p)[0]]
    seen, skipped = [], {}
    for pk in packs:
        assert 0 < pk.tokens <= SEQ
        assert sum(int(c.num_images[s]) for s in pk.samples) <= CAP
        if pk.truncated:
            assert pk.samples == pk.truncated and pk.tokens == SEQ  # alone in its pack
            assert c.length[pk.samples[0]] > SEQ
        else:
            assert pk.tokens == sum(int(c.length[s]) for s in pk.samples)
        assert pk.lengths == tuple(int(c.length[s]) for s in pk.samples)
        seen += pk.samples
        skipped.update(dict(pk.skipped))
    assert len(seen) == len(set(seen))
    assert sorted(seen + list(skipped)) == list(range(n))
    for sid in range(n):
        assert skipped.get(sid) == _expected_reason(c, sid, policy), sid
    assert len(skipped) > 0 and (policy == "skip" or any(pk.truncated for pk in packs))
    # best fit keeps padding low on this length mix (a guard against a packing regression)
    fill = sum(pk.tokens for pk in packs) / (len(packs) * SEQ)
    assert fill > 0.9, fill


def test_blend_quotas_and_determinism():
    sizes, weights = [100, 1000], (3.0, 1.0)
    order = epoch_order(sizes, weights, 400, seed=7, epoch=2, shuffle=True)
    assert len(order) == 400
    d0 = order[order < 100]
    assert len(d0) == 300 and np.bincount(d0, minlength=100).tolist() == [3] * 100
    d1 = order[order >= 100]
    assert len(d1) == 100 and len(set(d1.tolist())) == 100  # a subset, no repeats
    again = epoch_order(sizes, weights, 400, seed=7, epoch=2, shuffle=True)
    assert np.array_equal(order, again)
    other = epoch_order(sizes, weights, 400, seed=7, epoch=3, shuffle=True)
    assert not np.array_equal(order, other)
    assert set(other[other >= 100].tolist()) != set(d1.tolist())  # a new subset each epoch
    # natural proportions: every sample exactly once; no shuffle: file order
    assert sorted(epoch_order(sizes, (), None, 1, 0, True).tolist()) == list(range(1100))
    assert epoch_order([3, 2], (), None, 1, 0, False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dp_size,mbps", [(1, 1), (3, 2), (4, 1)])
def test_dp_ranks_disjoint_equal_and_complete(dp_size, mbps):
    n = 2000
    c = _costs(n, seed=1)
    p = PlanParams(SEQ, CAP, window=8, chunk=300, overlong_policy="truncate")
    order = EpochOrder([n], (), None, seed=5, epoch=1, shuffle=True)
    total = EpochPlan(order, c, p, 0, 1).total_packs()
    unit = dp_size * mbps
    per_rank = []
    for r in range(dp_size):
        plan, got, k = EpochPlan(order, c, p, 0, unit), [], 0
        while plan.get(k * dp_size + r) is not None:
            got.append(k * dp_size + r)
            k += 1
        per_rank.append(got)
    counts = {len(g) for g in per_rank}
    assert len(counts) == 1 and counts.pop() % mbps == 0
    union = sorted(g for got in per_rank for g in got)
    assert union == list(range(len(union)))  # disjoint and gap-free
    assert total - unit < len(union) <= total


def test_plan_from_chunk_hint_equals_fresh_plan():
    n = 1500
    c = _costs(n, seed=2)
    p = PlanParams(SEQ, CAP, window=8, chunk=200, overlong_policy="truncate")
    order = EpochOrder([n], (), None, seed=9, epoch=0, shuffle=True)
    fresh = EpochPlan(order, c, p, 0, 2)
    packs = []
    g = 0
    while (item := fresh.get(g)) is not None:
        packs.append(item)
        g += 1
    pack, chunk, first = packs[len(packs) // 2]
    resumed = EpochPlan(order, c, p, 0, 2, chunk, first)
    for g in range(len(packs) // 2, len(packs)):
        assert resumed.get(g) == packs[g]
    assert resumed.get(len(packs)) is None


def test_order_windows_are_slices_of_one_permutation():
    """The windowed order equals the whole-epoch order sliced, for blends with repeats and
    subsets, and every dataset's draws are whole permutations (each sample once per pass)."""
    sizes, weights = [7, 50, 300], (5.0, 1.0, 1.0)
    order = EpochOrder(sizes, weights, 600, seed=4, epoch=1, shuffle=True)
    whole = order.window(0, len(order))
    for a, b in [(0, 1), (3, 97), (250, 600), (599, 700)]:
        assert np.array_equal(order.window(a, b), whole[a:b])
    d0 = whole[whole < 7]
    assert np.bincount(d0, minlength=7).max() - np.bincount(d0, minlength=7).min() <= 1
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        assert sorted(epoch_order([n], (), None, 9, 0, True).tolist()) == list(range(n))


def test_order_of_a_huge_epoch_costs_only_its_window():
    """10^12 samples: a window in the middle is computed directly (no whole-epoch array would
    fit in memory), its ids are distinct and in range, and it is pinned to fixed values: the
    order is integer arithmetic, the same on every numpy version and machine."""
    order = EpochOrder([10**12], (), None, seed=1, epoch=0, shuffle=True)
    w = order.window(5 * 10**11, 5 * 10**11 + 4096)
    assert len(set(w.tolist())) == 4096 and w.min() >= 0 and w.max() < 10**12
    small = EpochOrder([3, 5], (), None, seed=1, epoch=0, shuffle=True).window(0, 8)
    assert small.tolist() == GOLDEN_ORDER


GOLDEN_ORDER = [2, 6, 0, 7, 4, 1, 5, 3]
"""EpochOrder([3, 5], seed 1, epoch 0): changes only with the algorithm (then refuse old
states: the loader's fingerprint names the order)."""


def test_windows_read_whole_blocks():
    """With blocks of 1024 and windows of 65536, a window of a 10^8-sample epoch holds exactly
    64 whole blocks of consecutive samples (its index rows and tar members come in runs), in
    shuffled order; the windows of an epoch still cover every sample once (checked at 10^6)."""
    big = EpochOrder([10**8], (), None, seed=3, epoch=0, shuffle=True, window=65536, block=1024)
    w = big.window(65536 * 7, 65536 * 8)
    blocks, counts = np.unique(w // 1024, return_counts=True)
    assert len(blocks) == 64 and (counts == 1024).all()
    assert (np.diff(w) != 1).mean() > 0.9  # shuffled inside the window
    mid = EpochOrder([10**6], (), None, seed=3, epoch=0, shuffle=True, window=4096, block=64)
    assert np.array_equal(np.sort(mid.window(0, 10**6)), np.arange(10**6))


def test_skips_of_a_chunk_without_packs_are_not_lost():
    """A chunk whose samples are all refused yields no pack; its skips ride on a neighbouring
    pack, so the epoch's skipped count is exact."""
    n, chunk = 600, 50
    c = _costs(n, seed=3)
    order = EpochOrder([n], (), None, seed=2, epoch=0, shuffle=True)
    refused = np.zeros(n, np.int8)
    for k in (0, 5, 11):  # the first, a middle and the last chunk
        refused[order.window(k * chunk, (k + 1) * chunk)] = 1
    c.refused = refused
    p = PlanParams(SEQ, CAP, window=8, chunk=chunk, overlong_policy="truncate")
    plan, g, skipped = EpochPlan(order, c, p, 0, 1), 0, []
    while (got := plan.get(g)) is not None:
        skipped += [sid for sid, _ in got[0].skipped]
        g += 1
    expected = {s for s in range(n) if refused[s] or _expected_reason(c, s, "truncate")}
    assert sorted(skipped) == sorted(expected)
