"""Background prefetch: works ahead of the trainer, but boundedly; errors surface; close() stops it.

Proves, by counting the packs the builder has finished (a wrapper around the real builder):
while the trainer holds back, the producer thread builds ahead of what was consumed (decode
overlaps the step) but never more than prefetch_depth + 1 micro-batches (the queue plus the one
waiting to enter it); with depth 0 nothing is built ahead. An exception in the producer reaches
the trainer at the batch where it happened, after the batches before it, and a retry resumes
at that batch. close() joins the thread. Waiting is by polling with a generous deadline, never a
fixed sleep that could pass by luck: the "bounded" check waits until the producer has stopped
making progress.
The GPU hand-off is called where it must be (a recording stand-in for `CudaHandoff`, CPU): every
build runs inside `building()` (the private stream on GPU), `seal` runs after it in the
producer's thread, `accept` runs in the trainer's thread with the event sealed for that very
batch, and no build context is left open in the trainer's thread (prefetch_depth 0 builds in
it); what the hand-off does on CUDA is tested in test_gpu.py.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from megatron_navil.data.cuda_handoff import CudaHandoff


def _count_builds(loader, fail_at=None):
    built = {"n": 0}
    real = loader.builder.build

    def build(pack):
        if fail_at is not None and built["n"] == fail_at:
            raise RuntimeError("storage vanished")
        out = real(pack)
        built["n"] += 1
        return out

    loader.builder.build = build
    return built


def _settle(built, timeout=20.0):
    """Wait until the build count stops changing for 0.5 s (the producer is blocked)."""
    deadline, last, since = time.time() + timeout, -1, time.time()
    while time.time() < deadline:
        if built["n"] != last:
            last, since = built["n"], time.time()
        elif time.time() - since > 0.5:
            return last
        time.sleep(0.05)
    raise AssertionError("producer never settled")


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_is_bounded(dataset, make_loader, depth):
    loader = make_loader([dataset.root], prefetch_depth=depth)
    built = _count_builds(loader)
    for consumed in (1, 2, 5):
        while loader.counters["batches"] < consumed:
            next(loader)
        ahead = _settle(built) - consumed
        assert ahead == (0 if depth == 0 else depth + 1), (depth, consumed, ahead)


@pytest.mark.parametrize("depth", [0, 2])
def test_producer_error_reaches_trainer(dataset, make_loader, depth):
    loader = make_loader([dataset.root], prefetch_depth=depth)
    real = loader.builder.build
    _count_builds(loader, fail_at=2)
    next(loader)
    next(loader)
    with pytest.raises(RuntimeError, match="storage vanished"):
        next(loader)
    loader.builder.build = real  # the storage is back: the loader retries the same batch
    assert next(loader).metadata["position"] == 2


def test_close_stops_the_thread(dataset, make_loader):
    loader = make_loader([dataset.root], prefetch_depth=2)
    next(loader)
    assert any(t.name == "navil-data-prefetch" for t in threading.enumerate())
    loader.close()
    assert not any(t.name == "navil-data-prefetch" for t in threading.enumerate())


class _RecordingHandoff(CudaHandoff):
    """CPU stand-in: records in which thread, and inside which context, the loader calls it."""

    def __init__(self):
        super().__init__(None)
        self._local = threading.local()
        self._sealed: dict[int, tuple[object, str]] = {}
        self.accepted: list[str] = []  # per batch handed out: the thread that built it

    def depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextlib.contextmanager
    def building(self):
        self._local.depth = self.depth() + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def seal(self, batch):
        assert self.depth() == 0, "seal must follow the build, outside its stream context"
        token = object()  # stands for the CUDA event
        self._sealed[id(batch)] = (token, threading.current_thread().name)
        return token

    def accept(self, batch, ready):
        assert threading.current_thread() is threading.main_thread()
        assert self.depth() == 0, "a build context leaked into the trainer's thread"
        token, producer = self._sealed.pop(id(batch))
        assert ready is token, "accepted with another batch's event"
        self.accepted.append(producer)
        return batch


@pytest.mark.parametrize("depth", [0, 2])
def test_handoff_is_called_around_each_build(dataset, make_loader, depth):
    loader = make_loader([dataset.root], prefetch_depth=depth)
    rec = _RecordingHandoff()
    loader.handoff = rec
    real = loader.builder.build

    def build(pack):
        assert rec.depth() == 1, "build outside the hand-off's building() context"
        return real(pack)

    loader.builder.build = build
    for _ in range(4):
        next(loader)
    producer = "navil-data-prefetch" if depth else threading.main_thread().name
    assert rec.accepted == [producer] * 4
