"""Run navil-pretrain as a real (multi-)process job and read its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launcher import ROOT, free_port, launch


def pretrain(world: int, args: list[str], timeout: float = 600) -> None:
    launch("megatron_navil.cli.pretrain", world, args, timeout=timeout)


def metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(path)}


def start_single(args: list[str], log: Path) -> subprocess.Popen:
    """One navil-pretrain process in the background, in its own process group (for kill /
    signal tests). Output goes to `log`: the checkpoint writer's helper processes would keep a
    pipe open after the main process dies."""
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_navil.cli.pretrain", *args],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    proc.log_path = log
    return proc


def wait_for_step(
    metrics_file: Path, step: int, proc: subprocess.Popen, timeout: float = 300
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics_file.exists() and any(r["step"] >= step for r in metrics(metrics_file)):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited early:\n{Path(proc.log_path).read_text()[-4000:]}"
            )
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> str:
    """SIGKILL the whole job (like a node failure); other signals go to the trainer only (like
    SLURM's pre-emption warning). Returns the job's output."""
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=300)
    return Path(proc.log_path).read_text()
