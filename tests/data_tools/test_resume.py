"""Re-running navil-preprocess resumes exactly: finished shards are kept, nothing is lost or
counted twice, and the result is byte-identical to an uninterrupted run.

Proves: (1) a run SIGKILLed mid-job and then re-run gives the same shards, indexes and
report.json as a clean run, and no worker of the killed run outlives it (within 10 s); (2)
leftovers of a kill at any point (a temporary tar, a half-written index, a tar renamed but not
committed) are removed and redone; (3) re-running with different
settings into the same directory is refused with exit code 2 (it would mix two layouts);
(4) a worker process killed mid-job (as by the OOM killer) stops the job with exit code 1 and a
one-line message, and re-running completes it identically.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import skimage.data as sd
from PIL import Image

from data_tools.preprocess import main
from tests.data_tools.conftest import preprocess_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compare_outputs(a: str, b: str) -> None:
    names = sorted(n for n in os.listdir(a) if n.startswith("shard-"))
    assert names == sorted(n for n in os.listdir(b) if n.startswith("shard-"))
    assert not [n for n in names if ".tmp" in n]
    for n in names + ["report.json", "manifest.json", "rejected.jsonl"]:
        assert filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False), n


def _slow_corpus(root: str, n: int = 240) -> list[str]:
    """Enough 384 px PNG decodes (a few ms each) that a kill lands mid-run."""
    os.makedirs(os.path.join(root, "img"))
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        im = Image.fromarray(getattr(sd, name)()).resize((384, 384))
        im.save(os.path.join(root, "img", f"{k}.png"), compress_level=1)
    with open(os.path.join(root, "caps.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": f"{i % 4}.png", "text": f"caption {i}"}) + "\n")
            if i % 37 == 5:
                f.write("{broken json\n")
    return [
        "--input",
        os.path.join(root, "caps.jsonl"),
        "--image-root",
        os.path.join(root, "img"),
        "--samples-per-shard",
        "5",
        "--num-workers",
        "1",
        "--log-every",
        "1000",
    ]


def _processes_with(token: str) -> list[int]:
    """PIDs whose environment carries `token` (the killed job's workers inherit it)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if token.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.mark.processes
def test_killed_run_resumes_to_identical_output(tmp_path):
    args = _slow_corpus(str(tmp_path / "c"))
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    assert main(args + ["--output", clean]) == 0
    token = f"navil-test-{os.getpid()}-{time.monotonic_ns()}"  # marks the job's processes
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "NAVIL_TEST_JOB": token,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.preprocess", *args, "--output", killed],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = [n for n in os.listdir(killed)] if os.path.isdir(killed) else []
        if sum(n.endswith(".index.json") for n in done) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    survivors = _processes_with(token)
    deadline = time.monotonic() + 10
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = _processes_with(token)
    assert not survivors, f"processes of the killed job still run: {survivors}"
    assert not os.path.exists(os.path.join(killed, "report.json"))
    committed = sum(n.endswith(".index.json") for n in os.listdir(killed))
    total = sum(n.endswith(".index.json") for n in os.listdir(clean))
    assert 2 <= committed < total
    assert main(args + ["--output", killed]) == 0
    _compare_outputs(clean, killed)
    part = json.load(open(os.path.join(killed, "partitions", "p00000.json")))
    assert part["resumed_segments"] == committed
    assert part["this_run"]["read"] < part["counts"]["read"]  # only the rest was redone


@pytest.mark.processes
def test_killed_worker_stops_the_job_cleanly_and_rerun_completes(tmp_path):
    """What the kernel's OOM killer does: a worker process dies mid-job."""
    import psutil

    args = _slow_corpus(str(tmp_path / "c"))
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    assert main(args + ["--output", clean]) == 0
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.preprocess", *args, "--output", out],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, killed = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        if os.path.isdir(out) and any(n.endswith(".index.json") for n in os.listdir(out)):
            # the spawned pool: a resource tracker and the worker; kill the one doing the work
            kids = psutil.Process(proc.pid).children(recursive=True)
            workers = [k for k in kids if "resource_tracker" not in " ".join(k.cmdline())]
            assert workers, [k.cmdline() for k in kids]
            for k in workers:
                k.kill()
            killed = True
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert killed and proc.returncode == 1, err
    assert "worker process died" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "report.json"))
    assert main(args + ["--output", out]) == 0
    _compare_outputs(clean, out)


def test_leftovers_of_a_kill_are_redone(corpus, reference_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference_run, out)
    segs = sorted(n for n in os.listdir(out) if n.endswith(".index.json"))
    last_with_tar = max(n for n in segs if json.load(open(os.path.join(out, n)))["tar"])
    os.remove(os.path.join(out, last_with_tar))  # killed after the tar rename, before commit
    with open(os.path.join(out, "shard-p00000-000099.tar.tmp"), "wb") as f:
        f.write(b"half a tar")
    with open(os.path.join(out, segs[0] + ".tmp4242"), "w") as f:
        f.write('{"half": ')
    for n in ("report.json", "manifest.json", "rejected.jsonl"):
        os.remove(os.path.join(out, n))
    shutil.rmtree(os.path.join(out, "partitions"))
    assert main(preprocess_args(corpus, out, "--dedup", "--num-workers", "0")) == 0
    _compare_outputs(reference_run, out)
    part = json.load(open(os.path.join(out, "partitions", "p00000.json")))
    assert part["resumed_segments"] == segs.index(last_with_tar)


def test_rerun_with_other_settings_is_refused(corpus, reference_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(reference_run, out)
    args = preprocess_args(corpus, out, "--num-workers", "0")  # without --dedup
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "new --output" in err and "Traceback" not in err
