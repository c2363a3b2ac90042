"""Worker processes: an ordered parallel map with bounded memory, plus side tasks.

`concurrent.futures.ProcessPoolExecutor.map` submits the whole input up front; a corpus of
hundreds of millions of records would sit in memory. Here at most `num_workers * inflight`
chunks are pending, and results come back in input order (so shards are deterministic). The
same workers take side tasks (`WorkerPool.submit`: navil-preprocess has them write whole shards
while others decode).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from megatron_navil.errors import JobError

T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(JobError):
    """A worker process was killed (usually out of memory); the job can be resumed."""


PARENT_POLL_S = 0.5
"""How often a worker checks that the job's main process is still alive."""


def _exit_with_parent(parent_pid: int) -> None:
    """Worker side: leave as soon as the job's main process is gone. A SIGKILLed (or OOM-killed)
    parent cannot shut its pool down, and spawned workers would otherwise keep running,
    reparented to init, holding memory and the resource tracker."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(parent_pid: int, initializer: Callable, initargs: tuple) -> None:
    _exit_with_parent(parent_pid)
    initializer(*initargs)


class _Done:
    """A finished result with a Future's interface (the in-process pool)."""

    def __init__(self, fn: Callable, arg):
        self._value, self._error = None, None
        try:
            self._value = fn(arg)
        except BaseException as e:  # like a Future: raised by result()
            self._error = e

    def done(self) -> bool:
        return True

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> bool:
        return False


class WorkerPool:
    """Spawned workers (or the calling process, num_workers = 0) for two kinds of work: an
    ordered, bounded map (`ordered`) and side tasks (`submit`) the caller collects itself."""

    def __init__(self, initializer: Callable, initargs: tuple, num_workers: int, inflight: int = 4):
        self.num_workers, self.inflight = num_workers, inflight
        self._init = (initializer, initargs)
        self._ex = None

    def __enter__(self) -> "WorkerPool":
        initializer, initargs = self._init
        if self.num_workers == 0:
            initializer(*initargs)
        else:
            # spawn, not fork: safe whatever threads the parent has (tqdm, DALI, torch)
            self._ex = ProcessPoolExecutor(
                self.num_workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(), initializer, initargs),
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[[T], R], arg: T):
        if self._ex is None:
            return _Done(fn, arg)
        try:
            return self._ex.submit(fn, arg)
        except BrokenProcessPool:
            raise _died() from None

    def ordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(item) for every item, in order, with at most num_workers * inflight pending."""
        if self._ex is None:
            for item in items:
                yield fn(item)
            return
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._ex.submit(fn, item))
                if len(pending) >= self.num_workers * self.inflight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise _died() from None
        finally:
            for f in pending:
                f.cancel()


def _died() -> WorkerDied:
    return WorkerDied(
        "a worker process died (likely out of memory: lower --num-workers "
        "or --max-image-pixels); re-run the same command to resume"
    )


def result_of(future):
    """future.result(), with a dead worker reported as WorkerDied."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise _died() from None


def ordered_map(
    fn: Callable[[T], R],
    initializer: Callable,
    initargs: tuple,
    items: Iterable[T],
    num_workers: int,
    inflight: int = 4,
) -> Iterator[R]:
    with WorkerPool(initializer, initargs, num_workers, inflight) as pool:
        yield from pool.ordered(fn, items)
