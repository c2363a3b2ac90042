"""Subprocesses with hard timeouts, and the time budget, for benchmarks/gpu_check.py.

Every step of the GPU check is a child process started in its own session, so a timeout kills
the whole tree (torchrun and its workers, pytest's, DALI's and the DataLoader's children):
SIGTERM, a short grace, then SIGKILL. Nothing here imports torch: the driver must survive a
broken CUDA/TE installation and report it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
KILL_GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL of a timed-out process group."""
ERROR_LINE = re.compile(r"\bERROR\b|^\w+(\.\w+)*(Error|Exception)\b")
MIN_GRANT_S = 5.0
"""A step that would get less than this (and less than it asked for) is skipped."""


class Budget:
    """The whole check's wall-clock allowance; each step gets min(its timeout, what is left)."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + total_s

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def grant(self, want_s: float) -> Optional[float]:
        """Seconds the step may run, or None when the budget cannot cover it any more."""
        left = self.left()
        if left < min(want_s, MIN_GRANT_S):
            return None
        return min(want_s, left)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class ProcResult:
    """How one child process ended."""

    cmd: list[str]
    rc: Optional[int]
    """Exit status (None when it was killed for exceeding its timeout)."""
    timed_out: bool
    wall_s: float
    stdout: Path
    stderr: Path

    def tail(self, n: int = 12, stream: str = "stderr") -> list[str]:
        """The last n non-empty lines of the child's stderr (or stdout)."""
        path = self.stderr if stream == "stderr" else self.stdout
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    def first_error(self) -> Optional[str]:
        """The first line of stderr that states an error: the project's `ERROR` log line or an
        exception's `SomethingError: message` (torchrun's own ChildFailedError report skipped)."""
        for line in self.tail(100000):
            text = line.strip()
            if "ChildFailedError" in text or "elastic/multiprocessing" in text:
                continue
            if ERROR_LINE.search(text):
                return re.sub(r"^\d\d:\d\d:\d\d ", "", text)[:400]  # the log's clock
        return None


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The driver's environment with PYTHONPATH made absolute (children may change directory)
    and unbuffered Python output (logs are complete up to a kill)."""
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(
        str((REPO / p).resolve()) if not os.path.isabs(p) else p for p in parts
    ) or str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NVTE_FRAMEWORK", "pytorch")
    env.update(extra or {})
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(
    cmd: Sequence[str], log_stem: Path, timeout_s: float, env: Optional[dict[str, str]] = None
) -> ProcResult:
    """Run cmd from the repository root; stdout/stderr to `<log_stem>.stdout.log/.stderr.log`."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out = log_stem.with_name(log_stem.name + ".stdout.log")
    err = log_stem.with_name(log_stem.name + ".stderr.log")
    t0 = time.monotonic()
    timed_out, rc = False, None
    with open(out, "w") as fo, open(err, "w") as fe:
        fe.write(f"$ {' '.join(cmd)}\n")
        fe.flush()
        try:
            proc = subprocess.Popen(
                list(cmd),
                cwd=REPO,
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env or child_env(),
                start_new_session=True,
            )
        except OSError as e:  # e.g. the interpreter is missing: report it like a failure
            fe.write(f"cannot start: {e}\n")
            return ProcResult(list(cmd), 127, False, time.monotonic() - t0, out, err)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
    return ProcResult(list(cmd), rc, timed_out, time.monotonic() - t0, out, err)
