"""Epoch orders computed a window at a time: position -> global sample id in O(window).

A blended epoch of Q positions: dataset d owns Q_d of them (largest-remainder quotas of
`total * w_d`, summing to Q exactly); its j-th draw is sample `P_{d,r}(j mod n_d)` of its n_d
samples, r = j // n_d (a fresh permutation per repetition: fewer draws than samples = a random
subset, more = repeats, each sample once per repetition). With `shuffle` the Q draws are then
placed by a permutation of [0, Q), keyed by (seed, epoch); without, in dataset order.

Locality: the permutations move *blocks* of `block` consecutive samples (draws), and positions
are then shuffled inside each window of `window` positions (the planner's chunk). So a window
holds whole blocks of consecutive index rows and shard members (window / block of them, from
anywhere in the corpus, in random order): planning it touches a few pages of the index per
block instead of a page per sample (at 10^8 samples a per-sample permutation would touch the
whole index every window), and the loader reads tar members in runs. Small sets use smaller
blocks (at least 256 blocks per dataset and per epoch; 1 = a per-sample permutation), so
subsets and shuffles of small data stay fine-grained.

The permutations are keyed Feistel networks on the smallest even-bit domain covering n,
cycle-walked back into [0, n): a bijection whose value at any position is computed directly, so
`window(a, b)` costs O(b - a) whatever the epoch size, nothing per sample is kept, and integer
arithmetic alone defines the order (the same on every numpy version and machine). Round keys
come from blake2b of (seed, epoch, dataset, round); per repetition they are mixed with r in
vectorised integer arithmetic.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

ROUNDS = 4
_U = np.uint64
_M1, _M2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
_GOLDEN = _U(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wraps modulo 2^64)."""
    x = x ^ (x >> _U(30))
    x = x * _M1
    x = x ^ (x >> _U(27))
    x = x * _M2
    return x ^ (x >> _U(31))


def round_keys(*ints: int) -> np.ndarray:
    """ROUNDS uint64 keys from a tuple of ints (seed, epoch, ...)."""
    raw = hashlib.blake2b(repr(ints).encode(), digest_size=8 * ROUNDS).digest()
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def _half_bits(n: np.ndarray) -> np.ndarray:
    """Half the bits of the smallest even-bit power of two >= n (at least 1)."""
    bits = np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.int64)
    # log2 of huge ints in float64 can round down: fix it up exactly
    bits += (np.left_shift(np.int64(1), bits) < n).astype(np.int64)
    return np.maximum((bits + 1) // 2, 1).astype(np.uint64)


def permute(x: np.ndarray, n, keys: np.ndarray) -> np.ndarray:
    """P(x) for x in [0, n): a bijection of [0, n) per key row. `n` is a scalar or an array
    like x; `keys` is [ROUNDS] or [ROUNDS, len(x)]."""
    x = np.asarray(x, dtype=np.uint64)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape)
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.ndim == 1:
        keys = np.broadcast_to(keys[:, None], (ROUNDS, len(x)))
    h = _half_bits(n.astype(np.int64))
    mask = (_U(1) << h) - _U(1)
    out = x.copy()
    todo = np.arange(len(x))
    while len(todo):  # cycle walking: leave the power-of-two domain back into [0, n)
        v = out[todo]
        hh, mm, kk = h[todo], mask[todo], keys[:, todo]
        left, right = v >> hh, v & mm
        for r in range(ROUNDS):
            left, right = right, left ^ (_mix(right ^ kk[r]) & mm)
        out[todo] = (left << hh) | right
        todo = todo[out[todo] >= n[todo]]
    return out.astype(np.int64)


def quotas(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    w = np.asarray(weights if len(weights) else sizes, dtype=np.float64)
    exact = total * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    # Largest remainder (ties: lower dataset index) makes the quotas sum to `total` exactly.
    for d in np.argsort(-(exact - q), kind="stable")[: total - int(q.sum())]:
        q[d] += 1
    return q.tolist()


MIN_BLOCKS = 256
"""A permutation moves at least this many blocks (smaller data: smaller blocks)."""


def _block(n, block: int):
    """The block size used for a domain of n (array or scalar)."""
    return np.maximum(1, np.minimum(block, np.asarray(n, dtype=np.int64) // MIN_BLOCKS))


def permute_blocks(x: np.ndarray, n, b, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, n): blocks of b consecutive values permuted (keyed Feistel over the
    ceil(n / b) blocks), offsets inside a block kept; cycle-walked past the last partial block."""
    x = np.asarray(x, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), x.shape)
    b = np.broadcast_to(np.asarray(b, dtype=np.int64), x.shape)
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.ndim == 1:
        keys = np.broadcast_to(keys[:, None], (ROUNDS, len(x)))
    nb = -(-n // b)
    out = x.copy()
    todo = np.arange(len(x))
    while len(todo):
        v, bb = out[todo], b[todo]
        out[todo] = permute(v // bb, nb[todo], keys[:, todo]) * bb + v % bb
        todo = todo[out[todo] >= n[todo]]
    return out


class EpochOrder:
    """The training order of one blended epoch, computed a window at a time."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        total: Optional[int],
        seed: int,
        epoch: int,
        shuffle: bool,
        window: int = 65536,
        block: int = 1,
    ):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        total = int(self.sizes.sum()) if total is None else int(total)
        q = np.asarray(quotas(sizes, weights, total), dtype=np.int64)
        self.total, self.shuffle = total, shuffle
        self.sample_offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.draw_offsets = np.concatenate([[0], np.cumsum(q)]).astype(np.int64)
        self.keys = (
            np.stack([round_keys(seed, epoch, d) for d in range(len(sizes))])
            if (shuffle and len(sizes))
            else None
        )
        self.blend_keys = round_keys(seed, epoch, -1) if shuffle else None
        self.window_keys = round_keys(seed, epoch, -2) if shuffle else None
        self.window_size, self.block = max(1, int(window)), max(1, int(block))

    def __len__(self) -> int:
        return self.total

    def window(self, start: int, stop: int) -> np.ndarray:
        """Global sample ids of positions [start, stop) (int64)."""
        stop = min(stop, self.total)
        if stop <= start:
            return np.zeros(0, np.int64)
        pos = np.arange(start, stop, dtype=np.int64)
        if self.shuffle:
            # inside its window, then whole blocks of draws across the epoch
            w = pos // self.window_size
            first = w * self.window_size
            length = np.minimum(self.window_size, self.total - first)
            pos = first + permute(pos - first, length, _keyed(self.window_keys, w))
            b = _block(self.total, self.block)
            draw = permute_blocks(pos, self.total, b, self.blend_keys)
        else:
            draw = pos
        d = np.searchsorted(self.draw_offsets, draw, side="right") - 1
        j = draw - self.draw_offsets[d]
        n = self.sizes[d]
        rep, k = j // n, j % n
        if self.shuffle:  # per-repetition round keys: the dataset's keys mixed with r
            keys = _mix(self.keys[d].T ^ (_mix(rep.astype(np.uint64) + _U(1)) * _GOLDEN))
            k = permute_blocks(k, n, _block(n, self.block), keys)
        return self.sample_offsets[d] + k


def _keyed(keys: np.ndarray, tweak: np.ndarray) -> np.ndarray:
    """[ROUNDS, len(tweak)] round keys: `keys` mixed with a per-element tweak."""
    return _mix(keys[:, None] ^ (_mix(tweak.astype(np.uint64) + _U(1)) * _GOLDEN))


def epoch_order(
    sizes: Sequence[int],
    weights: Sequence[float],
    total: Optional[int],
    seed: int,
    epoch: int,
    shuffle: bool,
) -> np.ndarray:
    """The whole epoch's order at once (tests, small data)."""
    order = EpochOrder(sizes, weights, total, seed, epoch, shuffle)
    return order.window(0, len(order))
