"""Deterministic pack planning: (seed, epoch, DP rank/size) -> the packs this rank trains on.

1. Epoch order (`epoch_order`): dataset d contributes quota_d = round(N * w_d) samples (largest
   remainder, so the quotas sum to N): fresh permutations of its samples, concatenated and cut
   to the quota (fewer than it has = a new random subset each epoch, more = repeats). The blended
   list is then shuffled with (seed, epoch). Global sample id = dataset offset + local index.
2. Packing (`pack_chunk`): the order is cut into chunks of `chunk` samples packed independently
   (so a restored loader re-plans one chunk, not the epoch). Inside a chunk: best fit among at
   most `window` open packs (budget: seq_length tokens, max_images images); a pack that is
   exactly full, or the fullest one when a new pack would exceed the window, is emitted; the rest
   at chunk end. A sample is never split. Over-long samples: `skip`, or `truncate` = a pack of
   its own, cut to seq_length by the builder. Samples with more images than max_images, or one
   image longer than seq_length, are always skipped, and so are samples the index refused
   (`GlobalCosts.refused`: untrusted input, index.py), with the refusal as the reason. Skips
   ride on the next emitted pack (`PlannedPack.skipped`) so counters advance with the batches
   the trainer sees.
3. Dealing (`EpochPlan`): global pack g goes to DP rank (g - start) % dp_size. Every rank gets the
   same count: the epoch's packs are cut to a multiple of unit = dp_size * micro_batches_per_step
   (the dropped tail, < unit packs, is the same on every rank). `start` is 0 except after a
   restore with another dp_size (the loader restarts dealing where the old world stopped).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_navil.data.index import REFUSALS

SKIP_TOO_MANY_IMAGES = "too_many_images"
SKIP_IMAGE_TOO_LONG = "image_longer_than_seq_length"
SKIP_OVERLONG = "overlong"


@dataclass(frozen=True)
class PlannedPack:
    """One pack of the epoch plan: which samples, how many tokens, what is truncated or skipped."""

    samples: tuple[int, ...]
    """Global sample ids in pack order."""
    tokens: int
    """Planned tokens (<= seq_length; truncated samples count as seq_length)."""
    truncated: tuple[int, ...] = ()
    """Samples (global ids) the builder cuts to seq_length."""
    skipped: tuple[tuple[int, str], ...] = ()
    """(global id, reason) of plan-time skips attributed to this pack."""


@dataclass(frozen=True)
class PlanParams:
    """The planner's inputs that change the plan (part of the loader state's fingerprint):
    pack length, images per pack, the lookahead window of the greedy fill, the chunk size of the
    incremental plan and what to do with a sample longer than a pack."""

    seq_length: int
    max_images: int
    window: int
    chunk: int
    overlong_policy: str  # "truncate" | "skip"


@dataclass
class GlobalCosts:
    """Per global sample id: planned length, image count, largest image's tokens."""

    length: np.ndarray
    num_images: np.ndarray
    max_image_tokens: np.ndarray
    refused: Optional[np.ndarray] = None
    """int8 code per sample, index.REFUSALS (0: usable); None: nothing refused."""


def _quotas(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    w = np.asarray(weights if len(weights) else sizes, dtype=np.float64)
    exact = total * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    # Largest remainder (ties: lower dataset index) makes the quotas sum to `total` exactly.
    for d in np.argsort(-(exact - q), kind="stable")[: total - int(q.sum())]:
        q[d] += 1
    return q.tolist()


def epoch_order(
    sizes: Sequence[int],
    weights: Sequence[float],
    total: Optional[int],
    seed: int,
    epoch: int,
    shuffle: bool,
) -> np.ndarray:
    """Global sample ids of one blended epoch, in training order (int64)."""
    total = int(sum(sizes)) if total is None else total
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts = []
    for d, (n, q) in enumerate(zip(sizes, _quotas(sizes, weights, total))):
        if shuffle:
            reps = [
                np.random.default_rng([seed, epoch, d, r]).permutation(n)
                for r in range(math.ceil(q / n))
            ]
            local = np.concatenate(reps)[:q] if reps else np.zeros(0, np.int64)
        else:
            local = np.arange(q, dtype=np.int64) % n
        parts.append(offsets[d] + local)
    order = np.concatenate(parts).astype(np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 1 << 20]).permutation(order)
    return order


def pack_chunk(ids: np.ndarray, costs: GlobalCosts, p: PlanParams) -> list[PlannedPack]:
    """Pack one chunk of the epoch order (see the module docstring for the rules)."""
    out: list[list] = []  # [samples, tokens, truncated, skipped]
    bins: list[list] = []  # open: [tokens, images, samples]
    skips: list[tuple[int, str]] = []

    def emit(samples: list[int], tokens: int, truncated: tuple = ()) -> None:
        out.append([tuple(samples), tokens, truncated, tuple(skips)])
        skips.clear()

    for sid in ids.tolist():
        length, n_img = int(costs.length[sid]), int(costs.num_images[sid])
        if costs.refused is not None and costs.refused[sid]:
            skips.append((sid, REFUSALS[int(costs.refused[sid])]))
        elif n_img > p.max_images:
            skips.append((sid, SKIP_TOO_MANY_IMAGES))
        elif int(costs.max_image_tokens[sid]) > p.seq_length:
            skips.append((sid, SKIP_IMAGE_TOO_LONG))
        elif length > p.seq_length:
            if p.overlong_policy == "skip":
                skips.append((sid, SKIP_OVERLONG))
            else:
                emit([sid], p.seq_length, (sid,))
        else:
            best = None
            for b in bins:  # best fit: the fullest open pack that still has room
                if (
                    b[0] + length <= p.seq_length
                    and b[1] + n_img <= p.max_images
                    and (best is None or b[0] > best[0])
                ):
                    best = b
            if best is None:
                best = [0, 0, []]
                bins.append(best)
            best[0] += length
            best[1] += n_img
            best[2].append(sid)
            if best[0] == p.seq_length:
                bins.remove(best)
                emit(best[2], best[0])
            elif len(bins) > p.window:
                fullest = max(bins, key=lambda b: b[0])  # max() keeps the oldest on ties
                bins.remove(fullest)
                emit(fullest[2], fullest[0])
    for b in bins:
        emit(b[2], b[0])
    if skips and out:  # skips after the chunk's last pack ride on that pack
        out[-1][3] = out[-1][3] + tuple(skips)
    return [PlannedPack(s, t, tr, sk) for s, t, tr, sk in out]


class EpochPlan:
    """Lazily planned packs of one epoch, dealt round-robin from global pack `start` on."""

    def __init__(
        self,
        order: np.ndarray,
        costs: GlobalCosts,
        params: PlanParams,
        start: int,
        unit: int,
        first_chunk: int = 0,
        first_pack: int = 0,
    ):
        self.order, self.costs, self.p = order, costs, params
        self.start, self.unit = start, unit
        self.num_chunks = math.ceil(len(order) / params.chunk)
        self.next_chunk, self.known = first_chunk, first_pack
        self.buffer: deque = deque()  # (chunk index, global index of its first pack, packs)

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.num_chunks

    def _limit(self) -> int:
        """Global packs [start, limit) are certainly dealt (a multiple of unit past start)."""
        return self.start + max(0, self.known - self.start) // self.unit * self.unit

    def _plan_next(self) -> None:
        c, k = self.next_chunk, self.p.chunk
        packs = pack_chunk(self.order[c * k : (c + 1) * k], self.costs, self.p)
        self.buffer.append((c, self.known, packs))
        self.known += len(packs)
        self.next_chunk += 1

    def get(self, g: int) -> Optional[tuple[PlannedPack, int, int]]:
        """(pack, its chunk, the chunk's first global pack index), or None past the epoch's
        dealt packs. Calls must not go backwards past an already dropped chunk."""
        while g >= self._limit() and not self.done:
            self._plan_next()
        if g >= self._limit():
            return None
        while self.buffer and self.buffer[0][1] + len(self.buffer[0][2]) <= g:
            self.buffer.popleft()
        c, first, packs = self.buffer[0]
        return packs[g - first], c, first

    def total_packs(self) -> int:
        """Plan the whole epoch; the number of packs (before cutting to the unit)."""
        while not self.done:
            self._plan_next()
        return self.known
