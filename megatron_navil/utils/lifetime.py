"""No process of a training job outlives the job: trainers die with their launcher, helpers with
their trainer.

Measured before this module: SIGKILL of `torchrun` left both trainers running (and writing
checkpoints) under init, since torchrun starts each worker in a session of its own; SIGKILL of a
trainer left Megatron's checkpoint-writer result-queue server (a multiprocessing Manager, spawned
at the first save) and its resource tracker behind forever.

Linux's PR_SET_PDEATHSIG makes the kernel signal a process when its parent exits; we use SIGKILL,
the same fault as killing the job (a resumed run continues from the last complete checkpoint).
- `tie_to_launcher()`: trainers started by torchrun (TORCHELASTIC_RUN_ID in the environment)
  die with it. Not otherwise: a trainer started from a shell must survive that shell (nohup).
- `tie_helpers()`: every process a trainer forks, and the writer's spawned Manager server, die
  with the trainer.
Other systems: no-ops (logged once at debug level).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_state = {"forking_pid": None, "hooked": False}


def die_with_parent(parent: Optional[int] = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits. `parent`: the pid expected
    as parent (default: the current one); if it is already gone, exit now. False where the
    platform cannot do it."""
    if not sys.platform.startswith("linux"):
        log.debug("PR_SET_PDEATHSIG is Linux-only: processes are not tied to their parent")
        return False
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def tie_to_launcher() -> bool:
    """A trainer started by torchrun dies with it (see the module docstring)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return die_with_parent()


def _before_fork() -> None:
    _state["forking_pid"] = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_state["forking_pid"])


def tie_helpers() -> None:
    """Processes this one forks, and the checkpoint writer's Manager server, die with it."""
    if not sys.platform.startswith("linux") or _state["hooked"]:
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _start_writer_result_queue()
    _state["hooked"] = True


def _start_writer_result_queue() -> None:
    """Start the result queue of Megatron's async file writer ourselves, its server tied to this
    process. NOTE: Megatron-Core 0.16.1 keeps it in the private global
    `filesystem_async._results_queue`, created on first use by a spawned Manager with no way to
    pass an initializer; tests/training/test_process_lifetime.py fails if that changes."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _state["manager"] = manager  # keep it alive as long as the process
