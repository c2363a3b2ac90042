"""No process of a training job outlives it (megatron_navil/utils/lifetime.py):

- torchrun alone SIGKILLed (as when a node agent or an srun step dies): both trainers and every
  helper they started are gone within 30 s (before: they kept training and writing checkpoints);
- one trainer SIGKILLed: the helpers it started (the checkpoint writer's Manager server and the
  multiprocessing resource tracker) are gone within 30 s (before: they stayed forever);
- the writer's result queue is ours and tied to the trainer: if Megatron-Core stops keeping it
  in `filesystem_async._results_queue`, the first test here says so.
Where to look: megatron_navil/utils/lifetime.py, megatron_navil/cli/pretrain.py.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.launcher import ROOT, free_port
from tests.training.runner import kill, metrics, start_single, wait_for_step
from tests.training.test_pretrain import BASE

pytestmark = [pytest.mark.processes, pytest.mark.distributed]


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids of `pids` still running (not zombies) after waiting up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:150]}")
        except psutil.NoSuchProcess:
            pass
    return "\n".join(out)


def _wait_for_helpers(root: psutil.Process, count: int, timeout: float = 120) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = root.children(recursive=True)
        if len(kids) >= count:
            return [k.pid for k in kids]
        time.sleep(0.2)
    raise AssertionError(f"expected {count} descendants of {root.pid}, saw {root.children(True)}")


def test_writer_result_queue_is_tied_to_this_process():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue"), (
        "Megatron-Core no longer keeps the writer's result queue in "
        "filesystem_async._results_queue: update megatron_navil/utils/lifetime.py"
    )


def test_trainer_killed_takes_its_helpers(tmp_path):
    m = tmp_path / "m.jsonl"
    run = BASE + ["--train-iters", "200", "--save", str(tmp_path / "ck"), "--save-interval", "1"]
    proc = start_single(run + ["--metrics-file", str(m)], tmp_path / "run.log")
    wait_for_step(m, 2, proc)  # a checkpoint was written: the writer's helpers exist
    helpers = _wait_for_helpers(psutil.Process(proc.pid), 2)
    os.kill(proc.pid, signal.SIGKILL)  # the trainer only, not its process group
    proc.wait(timeout=60)
    left = _gone_within(helpers, 30)
    assert not left, f"helpers outlived their trainer:\n{_describe(left)}"


def test_torchrun_killed_takes_the_whole_job(tmp_path):
    m = tmp_path / "m.jsonl"
    args = BASE + ["--train-iters", "500", "--save", str(tmp_path / "ck"), "--save-interval", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "torchrun.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "-m", "megatron_navil.cli.pretrain"]
    launcher = subprocess.Popen(
        cmd + args + ["--metrics-file", str(m)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    launcher.log_path = tmp_path / "torchrun.log"
    job = []
    try:
        wait_for_step(m, 2, launcher, timeout=300)
        # 2 trainers, and per trainer a writer Manager server and a resource tracker
        job = _wait_for_helpers(psutil.Process(launcher.pid), 6)
        step = max(r["step"] for r in metrics(m))
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone
        launcher.wait(timeout=60)
        left = _gone_within(job, 30)
        assert not left, f"processes outlived torchrun:\n{_describe(left)}"
        assert max(r["step"] for r in metrics(m)) <= step + 2  # nothing kept training
    finally:
        if launcher.poll() is None:
            kill(launcher)
        for pid in _gone_within(job, 0):  # after a failure: leave nothing behind
            os.kill(pid, signal.SIGKILL)
