"""Loader state: (epoch, position) plus what makes a restore exact and fast.

`position` counts the micro-batches this rank has handed to the trainer in `epoch` (not what
the prefetcher has built). DP rank r's k-th micro-batch of an epoch is global pack
`start + k * dp_size + r`, so (epoch, start, position) fixes the next batch on every rank; the
state is the same on all DP ranks except `counters` (rank-local metrics) and the planner hint.
Restoring with another dp_size (or another micro_batches_per_step: a step's unit of packs is
dp_size x micro_batches_per_step, and balanced dealing, dealing.py, permutes packs inside a unit)
remaps deterministically: the new world resumes dealing at the first global pack the old world had
not reached (start' = start + position * dp_size_old, position' = 0), so no pack is repeated or
lost. Under balanced dealing that holds for a state saved at a step boundary (position a multiple
of micro_batches_per_step), which is where the trainer saves, and, when packs move between the
steps of a window (balance_window_steps > 1), at a window boundary: a remap inside such a window
resumes after it and leaves the window's undealt packs out (logged with their number).
`fingerprint` identifies the data and every setting that shapes the plan; a state from other
data/settings is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_navil.errors import UserError

STATE_VERSION = 1

COUNTER_NAMES = (
    "batches",
    "samples",
    "tokens",
    "loss_tokens",
    "padding_tokens",
    "images",
    "skipped_images",
    "corrupt_samples",
    "truncated_samples",
    "skipped_samples",
)
"""Counters the loader accumulates over the batches it hands out (rank-local)."""


class LoaderStateError(UserError, ValueError):
    """A loader state that cannot be restored; the message says why and what to do."""


@dataclass
class LoaderState:
    """Where the loader is in the data, saved with every checkpoint for exact resume, also at
    another data-parallel size. `to_dict()` holds ints and strings only (JSON-able): the trainer
    stores it in the checkpoint's common part, which torch loads weights-only."""

    epoch: int = 0
    """Epoch of the next micro-batch."""
    position: int = 0
    """Micro-batches handed out in `epoch` since `start` (per rank)."""
    start: int = 0
    """Global pack index where this epoch's dealing began (0 unless restored at another dp_size)."""
    dp_size: int = 1
    """Data-parallel size the positions refer to."""
    chunk: int = 0
    """Planner hint: chunk holding the last handed pack (a restore re-plans from there)."""
    chunk_first_pack: int = 0
    """Global index of that chunk's first pack."""
    fingerprint: str = ""
    """Identity of the data and plan settings."""
    micro_batches_per_step: int = 0
    """Micro-batches per rank per step the positions refer to (0: a state saved before this
    was recorded, by round-robin dealing)."""
    window_steps: int = 1
    """Steps per dealing window (data.balance_window_steps; dealing.Dealer)."""
    counters: dict = field(default_factory=lambda: {k: 0 for k in COUNTER_NAMES})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["version"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise LoaderStateError(
                f"not a data loader state of version {STATE_VERSION}: {str(d)[:120]}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        counters = {k: 0 for k in COUNTER_NAMES}
        counters.update(d.get("counters", {}))
        return cls(
            **{k: v for k, v in d.items() if k in fields and k != "counters"}, counters=counters
        )

    def remapped(
        self, dp_size: int, micro_batches_per_step: int, window_steps: int = 1
    ) -> "LoaderState":
        """This state for a world of `dp_size` data-parallel ranks taking
        `micro_batches_per_step` packs each per step, dealing windows of `window_steps` steps
        (see the module docstring)."""
        new = (dp_size, micro_batches_per_step, window_steps)
        if new == (self.dp_size, self.micro_batches_per_step, self.window_steps):
            return dataclasses.replace(self, counters=dict(self.counters))
        return dataclasses.replace(
            self,
            start=self.start + self.consumed_packs()[0],
            position=0,
            dp_size=dp_size,
            micro_batches_per_step=micro_batches_per_step,
            window_steps=window_steps,
            counters=dict(self.counters),
        )

    def consumed_packs(self) -> tuple[int, int]:
        """(global packs past `start` that a remapped world must not deal again, how many of
        them were never handed out). All dealt packs form a prefix except inside a dealing
        window of several steps (dealing.Dealer), whose packs are spread over its steps: a
        remap in the middle of one skips the rest of that window (the second number)."""
        dealt = self.position * self.dp_size
        if self.window_steps <= 1 or self.micro_batches_per_step < 1:
            return dealt, 0
        unit = self.dp_size * self.micro_batches_per_step
        steps = -(-self.position // self.micro_batches_per_step)  # a partial step counts
        windows = -(-steps // self.window_steps)
        end = windows * self.window_steps * unit
        return end, end - dealt

    def mid_step(self) -> bool:
        """Saved inside a step (not by the trainer): a remap of a balanced unit is inexact."""
        return self.micro_batches_per_step > 1 and self.position % self.micro_batches_per_step != 0
