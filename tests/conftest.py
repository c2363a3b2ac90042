"""Shared pytest set-up: the CPU compatibility layer for in-process Megatron use, and the guard
that keeps the test tiers honest.

The CPU layer (megatron_navil/utils/cpu_compat.py) is turned on for the session and again
before every test: an in-process script or tool that made and destroyed its own world also
turned the layer off (`utils.distributed.destroy`), and a later test building a Megatron model
must not depend on which tests ran before it. It is turned off when the session ends.

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


@pytest.fixture(scope="session", autouse=True)
def _cpu_compat_session():
    """The CPU layer's lifetime in this test process: on for the session (a no-op with CUDA)."""
    from megatron_navil.utils import cpu_compat

    cpu_compat.activate()
    yield
    cpu_compat.deactivate()


@pytest.fixture(autouse=True)
def _cpu_compat_per_test(_cpu_compat_session):
    """On again before every test, whatever an earlier test's destroy() turned off."""
    from megatron_navil.utils import cpu_compat

    cpu_compat.activate()
    yield


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


def pytest_sessionstart(session):
    """Make this process the subreaper of everything the tests start (Linux), so a process
    orphaned by a killed parent is re-parented here, not to init, and the check below sees it."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves no process behind: a child of a test that outlives it (a trainer, a
    worker, a helper of a killed job) fails the run, named, and is killed. The test process's
    own multiprocessing helpers (resource tracker, Manager servers of in-process checkpoint
    writes) are left to its normal exit."""
    import psutil

    me = psutil.Process()
    leaked = []
    for p in me.children(recursive=True):
        try:
            own_helper = p.ppid() == me.pid and "multiprocessing" in " ".join(p.cmdline())
            if not own_helper and p.status() != psutil.STATUS_ZOMBIE:
                leaked.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
                p.kill()
        except psutil.NoSuchProcess:
            continue
    if leaked:
        session.config.get_terminal_writer().line(
            "processes left behind by the tests (killed now):\n  " + "\n  ".join(leaked), red=True
        )
        session.exitstatus = 1
