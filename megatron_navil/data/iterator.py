"""NaViLDataLoader: plan -> build -> bounded prefetch, with exact (epoch, position) state.

Flow: planner.EpochPlan (which packs) -> dealing.Dealer (which rank gets which pack of a
step: balanced by pack cost, or round-robin) -> builder.PackBuilder (tokens, DALI
decode, collate) -> a background thread keeps up to `prefetch_depth` finished micro-batches in a
bounded queue (the loader holds at most prefetch_depth + 1). The state is that of the last
batch handed out, so prefetching never changes what a restored loader yields. Built by
megatron_navil.data.loader (the public entry point, API described there).

GPU decode: batches are built on the loader's private CUDA stream and handed to the trainer's
current stream in `__next__` through a ready event (`CudaHandoff`, cuda_handoff.py); on the CPU
path the hand-off is a no-op.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Optional

import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.data.builder import PackBuilder
from megatron_navil.data.cuda_handoff import CudaHandoff
from megatron_navil.data.dealing import Dealer, PackCost
from megatron_navil.data.index import DataError
from megatron_navil.data.order import EpochOrder
from megatron_navil.data.planner import Costs, EpochPlan, PlanParams
from megatron_navil.data.state import COUNTER_NAMES, LoaderState, LoaderStateError
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How epochs are ordered and dealt (everything but the data itself)."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    samples_per_epoch: Optional[int]
    seed: int
    shuffle: bool
    dp_rank: int
    dp_size: int
    micro_batches_per_step: int
    shuffle_block: int = 1
    pack_cost: Optional[PackCost] = None
    """Cost of a planned pack for balanced dealing (dealing.py); None: round-robin."""
    window_steps: int = 1
    """Steps per dealing window (dealing.Dealer): > 1 moves packs between those steps."""


class _Stop(Exception):
    pass


class NaViLDataLoader:
    """Iterator of NaViLBatch; see the module docstring for the API."""

    def __init__(
        self,
        builder: PackBuilder,
        costs: Costs,
        params: PlanParams,
        schedule: Schedule,
        prefetch_depth: int,
        fingerprint: str,
        restart_on_iter: bool = False,
        handoff: Optional[CudaHandoff] = None,
    ):
        if not 0 <= schedule.dp_rank < schedule.dp_size:
            raise ValueError(f"dp_rank {schedule.dp_rank} outside 0..{schedule.dp_size - 1}")
        self.builder, self.costs, self.params, self.schedule = builder, costs, params, schedule
        self.prefetch_depth, self.restart_on_iter = prefetch_depth, restart_on_iter
        self.handoff = handoff if handoff is not None else CudaHandoff(None)
        self._state = LoaderState(
            dp_size=schedule.dp_size,
            fingerprint=fingerprint,
            micro_batches_per_step=schedule.micro_batches_per_step,
            window_steps=schedule.window_steps,
        )
        self._initial = self._state.to_dict()
        self._gen: Optional[Iterator] = None
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ public API
    def __iter__(self) -> "NaViLDataLoader":
        if self.restart_on_iter:
            self.load_state_dict(self._initial)
        return self

    def __next__(self) -> NaViLBatch:
        if self.prefetch_depth == 0:
            if self._gen is None:
                self._gen = self._produce(self._state)
            try:
                state, batch, ready = next(self._gen)
            except BaseException:
                self._gen = None  # like the thread path: a retry restarts from the state
                raise
        else:
            if self._thread is None:
                self._start_thread()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._join()
                raise item
            state, batch, ready = item
        # here, in the trainer's thread: its current stream waits for the batch's GPU work
        batch = self.handoff.accept(batch, ready)
        for k in COUNTER_NAMES:
            state.counters[k] = self._state.counters[k] + (
                1 if k == "batches" else batch.metadata.get(k, 0)
            )
        self._state = state
        return batch

    @property
    def counters(self) -> dict:
        """Rank-local totals over the batches handed out (restored with the state)."""
        return dict(self._state.counters)

    def state_dict(self) -> dict:
        return self._state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        s = LoaderState.from_dict(state)
        if s.fingerprint != self._state.fingerprint:
            raise LoaderStateError(
                f"the saved data loader state belongs to other data or plan settings "
                f"(fingerprint {s.fingerprint}, this loader {self._state.fingerprint}): the "
                "datasets, weights, seq_length, seed, multiscale, image cap, overlong policy or "
                "planner settings changed. Restore the original data config, or start the "
                "loader fresh (do not load its state)"
            )
        sch = self.schedule
        old = (s.dp_size, s.micro_batches_per_step, s.window_steps)
        new = (sch.dp_size, sch.micro_batches_per_step, sch.window_steps)
        if old != new and s.micro_batches_per_step:
            skip, left_out = s.consumed_packs()
            log.warning(
                "data loader state saved at dp_size %d x %d micro-batches per step (dealing "
                "windows of %d steps), restoring at %d x %d (%d): dealing resumes at global pack "
                "%d of epoch %d",
                *old,
                *new,
                s.start + skip,
                s.epoch,
            )
            if left_out:
                log.warning(
                    "the state was saved inside a dealing window of %d steps: the %d packs of "
                    "that window not yet handed out are left out of epoch %d (remap at a "
                    "multiple of %d steps to lose none)",
                    s.window_steps,
                    left_out,
                    s.epoch,
                    s.window_steps,
                )
            elif s.mid_step() and sch.pack_cost is not None:
                log.warning(
                    "the state was saved inside a step (position %d is not a multiple of %d): "
                    "under balanced dealing some packs of that step may repeat or be left out",
                    s.position,
                    s.micro_batches_per_step,
                )
        elif s.dp_size != sch.dp_size:  # a state from before micro_batches_per_step was saved
            log.warning(
                "data loader state saved at dp_size %d, restoring at %d: dealing "
                "resumes at global pack %d of epoch %d",
                s.dp_size,
                sch.dp_size,
                s.start + s.position * s.dp_size,
                s.epoch,
            )
        self._shutdown()
        self._state = s.remapped(*new)

    def close(self) -> None:
        self._shutdown()
        self.builder.decoder.close()
        self.builder.data.close()
        self.builder.costs.close()

    def __del__(self):  # best effort: never leave a producer thread behind
        try:
            self._shutdown()
        except Exception:
            pass

    # ------------------------------------------------------------------ production
    def _produce(
        self, state: LoaderState
    ) -> Iterator[tuple[LoaderState, NaViLBatch, Optional[torch.cuda.Event]]]:
        """(state after the batch, batch, its ready event or None) from `state` on; pure
        function of its input."""
        sch = self.schedule
        epoch, start, k = state.epoch, state.start, state.position
        hint = (state.chunk, state.chunk_first_pack)
        unit = sch.dp_size * sch.micro_batches_per_step
        while True:
            order = EpochOrder(
                sch.sizes,
                sch.weights,
                sch.samples_per_epoch,
                sch.seed,
                epoch,
                sch.shuffle,
                self.params.chunk,  # the order's shuffle windows are the planner's chunks
                sch.shuffle_block,
            )
            plan = EpochPlan(order, self.costs, self.params, start, unit, *hint)
            dealer = Dealer(
                plan,
                start,
                sch.dp_size,
                sch.micro_batches_per_step,
                sch.pack_cost,
                sch.window_steps,
            )
            while True:
                got = dealer.get(k, sch.dp_rank)
                if got is None:
                    break
                pack, chunk, first, g = got
                # the stream context ends before the yield: a suspended generator must not leave
                # the private stream current in the thread that resumes it (depth 0: the trainer)
                with self.handoff.building():
                    batch = self.builder.build(pack)
                ready = self.handoff.seal(batch)
                batch.metadata.update(epoch=epoch, position=k, global_pack=g)
                if sch.pack_cost is not None:  # what dealing balanced (the trainer may log it)
                    batch.metadata["planned_cost"] = sch.pack_cost(pack)
                k += 1
                yield (
                    LoaderState(
                        epoch,
                        k,
                        start,
                        sch.dp_size,
                        chunk,
                        first,
                        state.fingerprint,
                        sch.micro_batches_per_step,
                        sch.window_steps,
                        {},
                    ),
                    batch,
                    ready,
                )
            if k == 0 and start == 0:
                raise DataError(
                    f"epoch {epoch} gives no micro-batch: {plan.known} packs for "
                    f"dp_size {sch.dp_size} x micro_batches_per_step "
                    f"{sch.micro_batches_per_step}; use more data or a smaller seq_length"
                )
            epoch, start, k, hint = epoch + 1, 0, 0, (0, 0)

    def _start_thread(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch_depth)
        q, stop, gen = self._queue, self._stop, self._produce(self._state)

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stop

        def run() -> None:
            try:
                for item in gen:
                    if stop.is_set():
                        return
                    put(item)
            except _Stop:
                return
            except BaseException as e:  # hand the error to the trainer's thread
                try:
                    put(e)
                except _Stop:
                    pass

        self._thread = threading.Thread(target=run, name="navil-data-prefetch", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue = None, None

    def _shutdown(self) -> None:
        self._join()
        self._gen = None
