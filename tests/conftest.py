"""Shared pytest set-up: the CPU compatibility layer for in-process Megatron use, and the guard
that keeps the test tiers honest.

Markers are registered in pytest.ini (run with --strict-markers). A test that starts a process
(subprocess, a multiprocessing worker, a fork) must be marked `processes` or `distributed`:
`scripts/run_tests.sh --fast` leaves those out, so an unmarked one would make the fast tier slow
or flaky. The guard below fails such a test with a message naming the marker to add
(NAVIL_PROCESS_AUDIT=FILE lists them in FILE instead of failing, to audit a whole run).
"""

import multiprocessing.util
import os
import subprocess

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

_PROCESS_MARKERS = ("processes", "distributed")


@pytest.fixture(autouse=True)
def _process_guard(request, monkeypatch):
    """Refuse process launches in tests not marked `processes`/`distributed` (see above)."""
    if any(request.node.get_closest_marker(m) for m in _PROCESS_MARKERS):
        yield
        return
    audit, node = os.environ.get("NAVIL_PROCESS_AUDIT"), request.node.nodeid

    def guarded(original):
        def launch(*args, **kwargs):
            if audit:
                with open(audit, "a", encoding="utf-8") as f:
                    f.write(node + "\n")
                return original(*args, **kwargs)
            raise RuntimeError(
                f"{node} starts a process but is not marked: add "
                "@pytest.mark.processes (or distributed) so --fast skips it"
            )

        return launch

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded(subprocess.Popen.__init__))
    monkeypatch.setattr(
        multiprocessing.util, "spawnv_passfds", guarded(multiprocessing.util.spawnv_passfds)
    )
    monkeypatch.setattr(os, "fork", guarded(os.fork))
    yield


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron model-parallel state for a 1-process world (gloo/CPU), shared by unit tests."""
    import torch

    from megatron_navil.config import ParallelConfig
    from megatron_navil.utils import distributed

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    distributed.initialize_model_parallel(ParallelConfig(), seed=1)
    yield
    distributed.destroy()
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
