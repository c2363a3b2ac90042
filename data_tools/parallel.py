"""Ordered parallel map over chunks with bounded memory (spawned worker processes).

`concurrent.futures.ProcessPoolExecutor.map` submits the whole input up front; a corpus of
hundreds of millions of records would sit in memory. Here at most `num_workers * inflight`
chunks are pending, and results come back in input order (so shards are deterministic).
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


def ordered_map(
    fn: Callable[[T], R],
    initializer: Callable,
    initargs: tuple,
    items: Iterable[T],
    num_workers: int,
    inflight: int = 4,
) -> Iterator[R]:
    if num_workers == 0:
        initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    # spawn, not fork: safe whatever threads the parent has (tqdm, DALI, torch), same on macOS.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        num_workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, initargs),
    ) as ex:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) >= num_workers * inflight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerDied(
                "a worker process died (likely out of memory: lower --num-workers "
                "or --max-image-pixels); re-run the same command to resume"
            ) from None
        finally:
            for f in pending:
                f.cancel()
