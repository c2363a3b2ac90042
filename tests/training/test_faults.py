"""Faults a long run meets, injected for real into navil-pretrain (debug model, mock data):

- disk full during a save (a real tmpfs too small for two checkpoints; needs root to mount,
  skipped with the reason otherwise): one `error:` line naming the directory and "No space left
  on device", exit 1, the partial directory removed, `latest` still naming the previous
  checkpoint, and that checkpoint resumes and continues the uninterrupted losses exactly;
- SIGKILL inside a checkpoint write (the iteration directory exists, its metadata not yet),
  at several steps: `latest` never names a partial save, and re-running the same command
  reproduces the uninterrupted losses exactly (1e-7 relative: same layout, same arithmetic);
- one of two ranks SIGKILLed mid-run: the other exits within 60 s with one `error:` line saying
  what happened and how to resume (no traceback, no hang), and re-running the same command
  continues the uninterrupted single-process losses (1e-5 relative: DP=2 sums in another order);
- the latest checkpoint damaged on disk (a shard truncated; one byte flipped inside a stored
  tensor, which torch itself loads silently): re-running refuses it in one line naming the file
  and the earlier complete checkpoints, and `--load <earlier iter dir>` resumes from one of them
  with the uninterrupted losses;
- the training data made unreadable under a running job (its shards cut to nothing, as when
  storage goes away under open files): every rank stops together, a checkpoint of the last
  complete step is written, one `error:` line says so, exit 1; with the data back, the same
  command continues the uninterrupted run exactly;
- SLURM's pre-emption warning (SIGUSR1) saves after the current step and exits 0, and the same
  command resumes with the uninterrupted losses;
- an asynchronous save (--async-save) SIGKILLed while its files are written keeps the same
  guarantees as a synchronous one: `latest` never names it, the re-run is exact;
- killed during the very FIRST save, then requeued with `--load` = `--save` (Megatron-LM's
  requeue idiom): starts from step 0 with one warning line instead of failing on every requeue.
Where to look: megatron_navil/checkpoint/io.py (save), training/trainer.py (_resume_path).
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launcher import run_ranks, start_ranks
from tests.training.runner import kill, losses, pretrain, start_single, wait_for_step
from tests.training.test_pretrain import BASE

pytestmark = pytest.mark.processes

STEPS = 6
# One LR schedule whatever --train-iters a run is given, so runs of any length share losses.
RUN = BASE + ["--lr-decay-iters", str(STEPS)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    m = tmp_path_factory.mktemp("full") / "m.jsonl"
    pretrain(1, RUN + ["--train-iters", str(STEPS), "--metrics-file", str(m)])
    return losses(m)


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB tmpfs: one debug checkpoint (about 7 MB) fits, a second does not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _assert_losses(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-7), (s, got[s], want[s])


def test_disk_full_during_save(tmp_path, small_disk, uninterrupted):
    from megatron_navil.checkpoint import iteration_dir, read_latest

    ck = small_disk / "ck"
    args = RUN + ["--train-iters", str(STEPS), "--save", str(ck), "--save-interval", "1"]
    ((rc, out),) = run_ranks("megatron_navil.cli.pretrain", 1, args)
    assert rc == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "No space left on device" in errors[0] and str(iteration_dir(ck, 2)) in errors[0]
    assert "previous checkpoint (step 1) is intact" in errors[0]
    assert read_latest(ck) == 1 and not iteration_dir(ck, 2).exists()

    # The checkpoint left behind resumes (on a disk with room) and continues the same run.
    moved, m = tmp_path / "ck", tmp_path / "m.jsonl"
    shutil.copytree(ck, moved)
    pretrain(1, RUN + ["--train-iters", str(STEPS), "--save", str(moved), "--metrics-file", str(m)])
    got = losses(m)
    assert sorted(got) == list(range(2, STEPS + 1))
    _assert_losses(got, uninterrupted, got)


def _kill_inside_save(run: list[str], ck: Path, step: int, log: Path) -> None:
    """Start `run`, SIGKILL it while iter_<step> is being written (directory there, metadata
    not yet), and check the pointer never names it."""
    from megatron_navil.checkpoint import METADATA, iteration_dir, read_latest

    proc = start_single(run, log)
    d = iteration_dir(ck, step)
    deadline = time.time() + 300
    while not (d.exists() and not (d / METADATA).exists()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(
                f"never caught the save of step {step}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.005)
    kill(proc, signal.SIGKILL)
    latest = read_latest(ck)
    assert latest is None or latest < step
    if latest is not None:
        assert (iteration_dir(ck, latest) / METADATA).exists()


@pytest.mark.parametrize(
    "killed_at, mode", [(2, "sync"), (4, "sync"), (3, "async")], ids=["2", "4", "async-3"]
)
def test_sigkill_inside_a_save_then_rerun(tmp_path, uninterrupted, killed_at, mode):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN + ["--train-iters", str(STEPS), "--save", str(ck), "--save-interval", "1"]
    run += ["--metrics-file", str(m)] + (["--async-save"] if mode == "async" else [])
    _kill_inside_save(run, ck, killed_at, tmp_path / "killed.log")
    pretrain(1, run)  # the same command resumes from the newest complete checkpoint
    got = losses(m)  # a step run twice: the later line wins
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_losses(got, uninterrupted, got)


def test_killed_during_first_save_requeue_starts_over(tmp_path, uninterrupted):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN + ["--train-iters", str(STEPS), "--save", str(ck), "--load", str(ck)]
    run += ["--save-interval", "1", "--metrics-file", str(m)]
    _kill_inside_save(run, ck, 1, tmp_path / "killed.log")
    ((rc, out),) = run_ranks("megatron_navil.cli.pretrain", 1, run)
    assert rc == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "no complete checkpoint in" in line]
    assert len(warnings) == 1 and "starting from step 0" in warnings[0]
    got = losses(m)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_losses(got, uninterrupted, got)


def test_one_rank_killed_the_other_stops_and_the_job_resumes(tmp_path, uninterrupted):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN + ["--train-iters", str(STEPS), "--save", str(ck), "--save-interval", "1"]
    run += ["--metrics-file", str(m)]
    rank0, rank1 = start_ranks("megatron_navil.cli.pretrain", 2, run)
    deadline = time.time() + 300
    while not (m.exists() and any(r >= 3 for r in losses(m))):
        assert rank0.poll() is None and time.time() < deadline, rank0.communicate()[0][-3000:]
        time.sleep(0.05)
    rank1.kill()
    rank1.communicate()
    try:
        out, _ = rank0.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        rank0.kill()
        raise AssertionError(f"rank 0 hung after its peer died:\n{rank0.communicate()[0][-3000:]}")
    errors = [line for line in out.splitlines() if "error:" in line]
    assert rank0.returncode == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "re-run the same command to resume" in errors[0]

    assert all(rc == 0 for rc, _ in run_ranks("megatron_navil.cli.pretrain", 2, run))
    got = losses(m)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s] == pytest.approx(uninterrupted[s], rel=1e-5), (s, got[s], uninterrupted[s])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_is_named_and_an_earlier_one_resumes(
    tmp_path, uninterrupted, damage
):
    from megatron_navil.checkpoint import iteration_dir

    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN + ["--save", str(ck), "--save-interval", "1", "--metrics-file", str(m)]
    pretrain(1, run + ["--train-iters", "3"])
    shard = sorted(iteration_dir(ck, 3).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    ((rc, out),) = run_ranks("megatron_navil.cli.pretrain", 1, run + ["--train-iters", str(STEPS)])
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert shard.name in errors[0] and "iter_0000002" in errors[0], errors[0]

    earlier = iteration_dir(ck, 2)
    pretrain(1, run + ["--train-iters", str(STEPS), "--load", str(earlier)])
    got = losses(m)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_losses(got, uninterrupted, got)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """A tokenizer and a small preprocessed dataset (real navil-preprocess)."""
    from tests.data.corpus import make_dataset, train_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_tokenizer(str(root / "tok"))
    corpus = make_dataset(str(root / "ds"), str(root / "tok"), n_captions=12, n_text=8)
    return root / "tok", Path(corpus.root)


def test_data_that_disappears_stops_with_a_checkpoint(tmp_path, real_data):
    tok, shards = real_data
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN[RUN.index("--mock-data") + 1 :] + ["--data-path", str(data)]
    run += ["--tokenizer-model", str(tok), "--train-iters", "12", "--save", str(ck)]
    full = tmp_path / "full.jsonl"
    pretrain(1, run + ["--metrics-file", str(full), "--save", str(tmp_path / "unused")])

    proc = start_single(run + ["--metrics-file", str(m)], tmp_path / "run.log")
    wait_for_step(m, 3, proc)
    for tar in data.glob("*.tar"):
        os.truncate(tar, 0)  # storage gone under the open files
    proc.wait(timeout=300)
    out = Path(proc.log_path).read_text()
    errors = [line for line in out.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "cannot read the training data" in errors[0] and "saved step" in errors[0]
    from megatron_navil.checkpoint import read_latest

    stopped = read_latest(ck)
    assert stopped is not None and stopped >= 3 and f"saved step {stopped}" in errors[0]

    shutil.rmtree(data)
    shutil.copytree(shards, data)
    pretrain(1, run + ["--metrics-file", str(m)])
    got, want = losses(m), losses(full)
    assert sorted(got) == list(range(1, 13))
    _assert_losses(got, want, got)


def test_sigusr1_saves_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
    from megatron_navil.checkpoint import read_latest

    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = RUN + ["--train-iters", str(STEPS), "--save", str(ck), "--metrics-file", str(m)]
    proc = start_single(run, tmp_path / "run.log")
    wait_for_step(m, 2, proc)
    out = kill(proc, signal.SIGUSR1)
    assert proc.returncode == 0, out[-3000:]
    stopped = read_latest(ck)
    assert stopped is not None and 2 <= stopped < STEPS, out[-3000:]
    pretrain(1, run)
    got = losses(m)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_losses(got, uninterrupted, got)
