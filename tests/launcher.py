"""Launch a test worker module on N real processes (gloo), torchrun-style, and collect results.

Each rank runs `python -m <module> <args>` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT set,
exactly as torchrun would; a failure on any rank fails the test with that rank's output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(module: str, world_size: int, args: list[str]) -> list[subprocess.Popen]:
    """Start `module` on `world_size` ranks (torchrun's env variables); output is piped."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def run_ranks(
    module: str, world_size: int, args: list[str], timeout: float = 600.0
) -> list[tuple[int, str]]:
    """Start `module` on `world_size` ranks and return each rank's (exit code, stdout+stderr),
    failing or not."""
    procs = start_ranks(module, world_size, args)
    results = []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{module} rank {rank} timed out after {timeout}s")
        results.append((p.returncode, out))
    return results


def launch(module: str, world_size: int, args: list[str], timeout: float = 600.0) -> None:
    """run_ranks, failing the test with each failed rank's output."""
    failures = [
        f"--- rank {rank} exit {rc} ---\n{out[-6000:]}"
        for rank, (rc, out) in enumerate(run_ranks(module, world_size, args, timeout))
        if rc != 0
    ]
    if failures:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n" + "\n".join(failures))
