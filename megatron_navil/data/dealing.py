"""Dealing packs to data-parallel ranks so that every rank's step costs about the same.

A training step consumes one *unit* of consecutive global packs: unit = dp_size x
micro_batches_per_step packs from `start + u * unit` on. Round-robin dealing (slot j of the unit
is pack j: rank j % dp_size) leaves the step time to the rank that drew the most vision work: the
packs all hold about seq_length tokens, but a pack of large images costs the vision encoder
several times what a text pack costs, so the step waits for the slowest rank.

Balanced dealing keeps each unit's set of packs (the step trains on exactly the same samples, so
the global batch, the loss and resume points do not change) and only chooses which rank gets
which pack: longest-processing-time first (the costliest pack goes to the least loaded rank that
still has room; every rank gets exactly micro_batches_per_step packs), then pairwise swaps between
the most and the least loaded rank while they narrow the gap. Each rank keeps its packs in unit
order. The cost of a pack comes from a function the caller supplies (the trainer passes the model
FLOPs of training/flops.py); every rank computes the same assignment from the same plan, with no
communication.

With one micro-batch per rank per step there is nothing to choose (every rank gets one pack of
the step whichever way they are dealt): balance then needs more micro-batches per step.
Restoring keeps exactness: a unit's assignment depends only on its packs, dp_size and
micro_batches_per_step, and checkpoints fall on step (unit) boundaries, so changing dp_size or
micro_batches_per_step on resume rebases dealing at the first pack not yet consumed
(state.LoaderState.remapped).
"""

from __future__ import annotations

import heapq
import random
from typing import Callable, Optional, Sequence

from megatron_navil.data.planner import EpochPlan, PlannedPack

__all__ = ["balance", "Dealer", "epoch_step_loads", "imbalance", "step_loads"]

PackCost = Callable[[PlannedPack], float]
"""Cost of one planned pack (e.g. its model FLOPs); only ratios matter."""


def balance(costs: Sequence[float], dp_size: int, per_rank: int) -> list[int]:
    """Slot -> pack (indices into `costs`, one unit) so that the ranks' summed costs are close.

    Slot j belongs to rank j % dp_size (its (j // dp_size)-th micro-batch of the step), as in
    round-robin dealing; each rank's packs keep their unit order."""
    n = len(costs)
    if n != dp_size * per_rank:
        raise ValueError(f"{n} packs for {dp_size} ranks x {per_rank} micro-batches")
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    loads = [0.0] * dp_size
    open_ranks = [(0.0, r) for r in range(dp_size)]  # (load, rank) of ranks with room
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):  # LPT; ties by index
        load, r = heapq.heappop(open_ranks)
        ranks[r].append(i)
        loads[r] = load + costs[i]
        if len(ranks[r]) < per_rank:
            heapq.heappush(open_ranks, (loads[r], r))
    _refine(costs, ranks, loads)
    slots = [0] * n
    for r, packs in enumerate(ranks):
        for m, i in enumerate(sorted(packs)):
            slots[m * dp_size + r] = i
    return slots


def _refine(costs: Sequence[float], ranks: list[list[int]], loads: list[float]) -> None:
    """Swap one pack of the most loaded rank with one of the least loaded rank while that
    lowers the larger of the two loads (LPT leaves up to a pack's cost of slack when every rank
    must take the same number of packs). Bounded passes (the cost of a unit stays O(packs x
    micro-batches) at any dp_size); each strictly narrows the pair it swaps."""
    for _ in range(min(4 * len(ranks), 64)):
        hi = max(range(len(ranks)), key=lambda r: (loads[r], -r))
        lo = min(range(len(ranks)), key=lambda r: (loads[r], r))
        gap = loads[hi] - loads[lo]
        best, best_left = None, gap
        for a in ranks[hi]:
            for b in ranks[lo]:
                d = costs[a] - costs[b]
                if 0 < d < gap and abs(gap - 2 * d) < best_left:
                    best, best_left = (a, b), abs(gap - 2 * d)
        if best is None:
            return
        a, b = best
        ranks[hi][ranks[hi].index(a)], ranks[lo][ranks[lo].index(b)] = b, a
        d = costs[a] - costs[b]
        loads[hi] -= d
        loads[lo] += d


def step_loads(costs: Sequence[float], slots: Sequence[int], dp_size: int) -> list[float]:
    """Each rank's summed cost in one unit dealt by `slots` (slot j -> pack slots[j])."""
    loads = [0.0] * dp_size
    for j, i in enumerate(slots):
        loads[j % dp_size] += costs[i]
    return loads


class Dealer:
    """The pack of each (rank, micro-batch) slot of an epoch: balanced when a cost is given,
    else round-robin. Wraps an EpochPlan; slots must be asked in order (each rank asks for its
    own k = 0, 1, ...).

    `window_steps` W > 1 also moves packs between the W steps of a window (W consecutive units
    from `start`): the window's packs are sorted by cost and cut into W strata of one unit, each
    stratum is one step (so a step's packs cost alike and its ranks can be balanced even with one
    micro-batch each), the steps' order inside the window is shuffled (keyed by the window's first
    pack, so the same on every rank) so that heavy steps do not come first. A window at the end
    of the epoch may hold fewer units."""

    def __init__(
        self,
        plan: EpochPlan,
        start: int,
        dp_size: int,
        micro_batches_per_step: int,
        cost: Optional[PackCost] = None,
        window_steps: int = 1,
    ):
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.plan, self.start, self.dp = plan, start, dp_size
        self.per_rank = micro_batches_per_step
        self.unit = dp_size * micro_batches_per_step
        self.cost, self.window_steps = cost, window_steps
        self._window = -1
        self._packs: list[tuple[PlannedPack, int, int]] = []
        self._slots: list[list[int]] = []  # per step of the window: slot -> index in _packs

    @property
    def balanced(self) -> bool:
        """False where there is nothing to choose: no cost, one rank, or one micro-batch per
        rank without moving packs between steps."""
        return (
            self.cost is not None and self.dp > 1 and (self.per_rank > 1 or self.window_steps > 1)
        )

    def get(self, k: int, rank: int) -> Optional[tuple[PlannedPack, int, int, int]]:
        """(pack, planner hint chunk, hint first pack, global pack index) for rank `rank`'s
        k-th micro-batch of the epoch, or None past the epoch's dealt packs. The hint is where a
        restore must re-plan from: the pack's own chunk (round-robin) or that of its window's
        first pack (balanced: a restore inside the window needs the whole window)."""
        s = k * self.dp + rank
        if not self.balanced:
            got = self.plan.get(self.start + s)
            return None if got is None else (*got, self.start + s)
        u, j = divmod(s, self.unit)
        w, step = divmod(u, self.window_steps)
        if w != self._window and not self._load_window(w):
            return None
        if step >= len(self._slots):  # a short last window: the epoch ends here
            return None
        i = self._slots[step][j]
        _, chunk, first = self._packs[0]
        base = self.start + w * self.window_steps * self.unit
        return self._packs[i][0], chunk, first, base + i

    def _load_window(self, w: int) -> bool:
        base = self.start + w * self.window_steps * self.unit
        packs = []
        for g in range(base, base + self.window_steps * self.unit):  # in order: the plan
            got = self.plan.get(g)  # drops chunks behind it
            if got is None:  # the epoch's dealt packs are whole units
                break
            packs.append(got)
        steps = len(packs) // self.unit
        if not steps:
            return False
        costs = [self.cost(p) for p, _, _ in packs]
        if self.window_steps == 1:
            strata = [list(range(self.unit))]
        else:
            order = sorted(range(len(packs)), key=lambda i: (-costs[i], i))
            strata = [sorted(order[t * self.unit : (t + 1) * self.unit]) for t in range(steps)]
            random.Random(base).shuffle(strata)
        self._slots = []
        for members in strata:
            slots = balance([costs[i] for i in members], self.dp, self.per_rank)
            self._slots.append([members[x] for x in slots])
        self._window, self._packs = w, packs
        return True


def epoch_step_loads(
    plan: EpochPlan,
    dp_size: int,
    micro_batches_per_step: int,
    cost: PackCost,
    balanced: bool,
    max_steps: Optional[int] = None,
    window_steps: int = 1,
) -> list[list[float]]:
    """Per step, each rank's summed pack cost over one epoch's plan (from global pack 0),
    dealt balanced or round-robin: what benchmarks and tests measure dealing with."""
    dealer = Dealer(
        plan, 0, dp_size, micro_batches_per_step, cost if balanced else None, window_steps
    )
    steps: list[list[float]] = []
    while max_steps is None or len(steps) < max_steps:
        loads = [0.0] * dp_size
        for m in range(micro_batches_per_step):
            k = len(steps) * micro_batches_per_step + m
            for r in range(dp_size):
                got = dealer.get(k, r)
                if got is None:
                    return steps
                loads[r] += cost(got[0])
        steps.append(loads)
    return steps


def imbalance(steps: list[list[float]]) -> tuple[float, float]:
    """(sum over steps of the slowest rank / sum of the mean rank - 1, the worst single step's
    slowest / mean - 1): the share of step time ranks spend waiting, if time follows cost."""
    if not steps:
        return 0.0, 0.0
    slow = sum(max(s) for s in steps)
    mean = sum(sum(s) / len(s) for s in steps)
    worst = max(max(s) / (sum(s) / len(s)) for s in steps if sum(s) > 0)
    return slow / mean - 1.0, worst - 1.0
