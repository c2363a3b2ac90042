"""Deterministic pack planning: (seed, epoch, DP rank/size) -> the packs this rank trains on.

1. Epoch order (order.py): dataset d contributes quota_d = round(N * w_d) samples (largest
   remainder, so the quotas sum to N): fresh permutations of its samples, concatenated and cut
   to the quota (fewer than it has = a new random subset each epoch, more = repeats), the blended
   draws placed by a permutation keyed by (seed, epoch). Global sample id = dataset offset +
   local index. The order is computed one window (chunk) at a time, never for the whole epoch.
2. Packing (`pack_chunk`): the order is cut into chunks (windows) of `chunk` samples packed
   independently, each with its costs computed when it is planned (costs.py), so planning costs
   O(chunk) and a restored loader re-plans one chunk. Inside a chunk: best fit among at
   most `window` open packs (budget: seq_length tokens, max_images images); a pack that is
   exactly full, or the fullest one when a new pack would exceed the window, is emitted; the rest
   at chunk end. A sample is never split. Over-long samples: `skip`, or `truncate` = a pack of
   its own, cut to seq_length by the builder. Samples with more images than max_images, or one
   image longer than seq_length, are always skipped, and so are samples the index refused
   (`refused` codes: untrusted input, duplicates; costs.py), with the refusal as the reason. Skips
   ride on the next emitted pack (`PlannedPack.skipped`) so counters advance with the batches
   the trainer sees.
3. Dealing (`EpochPlan`): global pack g goes to DP rank (g - start) % dp_size. Every rank gets the
   same count: the epoch's packs are cut to a multiple of unit = dp_size * micro_batches_per_step
   (the dropped tail, < unit packs, is the same on every rank). `start` is 0 except after a
   restore with another dp_size (the loader restarts dealing where the old world stopped).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from megatron_navil.data.columns import REFUSALS
from megatron_navil.data.costs import WindowCosts
from megatron_navil.data.order import EpochOrder, epoch_order

__all__ = ["EpochOrder", "epoch_order", "EpochPlan", "GlobalCosts", "PlanParams", "pack_chunk"]

SKIP_TOO_MANY_IMAGES = "too_many_images"
SKIP_IMAGE_TOO_LONG = "image_longer_than_seq_length"
SKIP_OVERLONG = "overlong"


@dataclass(frozen=True)
class PlannedPack:
    """One pack of the epoch plan: which samples, how many tokens, what is truncated or skipped."""

    samples: tuple[int, ...]
    """Global sample ids in pack order."""
    lengths: tuple[int, ...]
    """Planned (untruncated) token length of each sample: the builder checks them."""
    tokens: int
    """Planned tokens (<= seq_length; truncated samples count as seq_length)."""
    truncated: tuple[int, ...] = ()
    """Samples (global ids) the builder cuts to seq_length."""
    skipped: tuple[tuple[int, str], ...] = ()
    """(global id, reason) of plan-time skips attributed to this pack."""
    visual_tokens: int = 0
    """Planned tokens that go to the visual experts (costs.WindowCosts.visual_tokens)."""
    patches: int = 0
    """Vision-encoder patches of the pack's images."""
    square_patches: float = 0.0
    """Sum of patches^2 over the pack's images and scales (encoder attention pairs)."""
    image_tokens: int = 0
    """Planned tokens of the pack's images (markers and line breaks included)."""

    def causal_pairs(self, seq_length: int) -> float:
        """Sum over samples of len * (len + 1) / 2, truncated samples cut to seq_length: the
        query-key pairs of the LLM's causal attention within each sample."""
        cut = [min(n, seq_length) for n in self.lengths]
        return float(sum(n * (n + 1) // 2 for n in cut))


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


class Costs(Protocol):
    """What the planner needs of the data: costs of a window of global ids (costs.CostModel)."""

    def window(self, gids: np.ndarray) -> WindowCosts: ...


@dataclass
class GlobalCosts:
    """Costs given as whole-corpus arrays by global id (tests, small synthetic data)."""

    length: np.ndarray
    num_images: np.ndarray
    max_image_tokens: np.ndarray
    refused: Optional[np.ndarray] = None
    """int8 code per sample, columns.REFUSALS (0: usable); None: nothing refused."""
    visual_tokens: Optional[np.ndarray] = None
    """Per sample, as WindowCosts.visual_tokens; None: no vision work known."""
    patches: Optional[np.ndarray] = None
    """Per sample, as WindowCosts.patches."""
    square_patches: Optional[np.ndarray] = None
    """Per sample, as WindowCosts.square_patches."""
    image_tokens: Optional[np.ndarray] = None
    """Per sample, as WindowCosts.image_tokens."""

    def window(self, gids: np.ndarray) -> WindowCosts:
        refused = np.zeros(len(gids), np.int8) if self.refused is None else self.refused[gids]

        def take(a):
            return None if a is None else a[gids]

        return WindowCosts(
            self.length[gids],
            self.num_images[gids],
            self.max_image_tokens[gids],
            refused,
            take(self.visual_tokens),
            take(self.patches),
            take(self.square_patches),
            take(self.image_tokens),
        )


def pack_chunk(
    ids: np.ndarray, costs: WindowCosts, p: PlanParams
) -> tuple[list[PlannedPack], tuple[tuple[int, str], ...]]:
    """Pack one chunk of the epoch order; `costs` are aligned with `ids` (see the module
    docstring for the rules). Returns (packs, orphan skips): the skips of a chunk that yields
    no pack at all, for the caller to attach to a neighbouring pack."""
    out: list[list] = []  # [samples, tokens, truncated, skipped]
    bins: list[list] = []  # open: [tokens, images, samples]
    skips: list[tuple[int, str]] = []
    length_of: dict[int, int] = {}
    visual, patches, square, image_tokens = costs.vision()
    vision_of: dict[int, tuple[int, int, float, int]] = {}

    def emit(samples: list[int], tokens: int, truncated: tuple = ()) -> None:
        out.append([tuple(samples), tokens, truncated, tuple(skips)])
        skips.clear()

    rows = zip(
        ids.tolist(),
        costs.length.tolist(),
        costs.num_images.tolist(),
        costs.max_image_tokens.tolist(),
        costs.refused.tolist(),
    )
    for row, (sid, length, n_img, max_img, refused) in enumerate(rows):
        length_of[sid] = length
        vision_of[sid] = (
            int(visual[row]),
            int(patches[row]),
            float(square[row]),
            int(image_tokens[row]),
        )
        if refused:
            skips.append((sid, REFUSALS[refused]))
        elif n_img > p.max_images:
            skips.append((sid, SKIP_TOO_MANY_IMAGES))
        elif max_img > p.seq_length:
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
    packs = [
        PlannedPack(
            s,
            tuple(length_of[i] for i in s),
            t,
            tr,
            sk,
            sum(vision_of[i][0] for i in s),
            sum(vision_of[i][1] for i in s),
            sum(vision_of[i][2] for i in s),
            sum(vision_of[i][3] for i in s),
        )
        for s, t, tr, sk in out
    ]
    return packs, () if out else tuple(skips)


class EpochPlan:
    """Lazily planned packs of one epoch, dealt round-robin from global pack `start` on."""

    def __init__(
        self,
        order: EpochOrder,
        costs: Costs,
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
        self.carry: tuple = ()  # skips of packless chunks before the epoch's first pack

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.num_chunks

    def _limit(self) -> int:
        """Global packs [start, limit) are certainly dealt (a multiple of unit past start)."""
        return self.start + max(0, self.known - self.start) // self.unit * self.unit

    def _plan_next(self) -> None:
        c, k = self.next_chunk, self.p.chunk
        ids = self.order.window(c * k, (c + 1) * k)
        packs, orphans = pack_chunk(ids, self.costs.window(ids), self.p)
        last = next((b[2] for b in reversed(self.buffer) if b[2]), None)
        if orphans and last is not None:
            # a chunk without packs (all skipped): its skips ride on the previous pack, which
            # get() has not handed out yet (it always plans one pack ahead)
            last[-1] = dataclasses.replace(last[-1], skipped=last[-1].skipped + orphans)
        elif orphans:
            self.carry += orphans
        if packs and self.carry:
            packs[0] = dataclasses.replace(packs[0], skipped=self.carry + packs[0].skipped)
            self.carry = ()
        self.buffer.append((c, self.known, packs))
        self.known += len(packs)
        self.next_chunk += 1

    def get(self, g: int) -> Optional[tuple[PlannedPack, int, int]]:
        """(pack, its chunk, the chunk's first global pack index), or None past the epoch's
        dealt packs. Calls must not go backwards past an already dropped chunk."""
        # one pack ahead: a following packless chunk's skips can still join pack g
        while (g >= self._limit() or self.known <= g + 1) and not self.done:
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
