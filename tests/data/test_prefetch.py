"""Background prefetch: works ahead of the trainer, but boundedly; errors surface; close() stops it.

Proves, by counting the packs the builder has finished (a wrapper around the real builder):
while the trainer holds back, the producer thread builds ahead of what was consumed (decode
overlaps the step) but never more than prefetch_depth + 1 micro-batches (the queue plus the one
waiting to enter it); with depth 0 nothing is built ahead. An exception in the producer reaches
the trainer at the batch where it happened, after the batches before it, and a retry resumes
at that batch. close() joins the thread. Waiting is by polling with a generous deadline, never a fixed sleep that could pass by
luck: the "bounded" check waits until the producer has stopped making progress.
"""

from __future__ import annotations

import threading
import time

import pytest


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
