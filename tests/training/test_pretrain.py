"""navil-pretrain end to end (mock data, debug model, real processes):

- golden loss curve: the debug config's per-step losses equal a stored curve
  (tests/assets/golden_debug_losses.json). Tolerance 1e-4 relative: fp32 on CPU is
  deterministic on one machine; the margin absorbs BLAS differences between CPUs. A changed
  model, optimizer, schedule or data order moves the curve by far more.
- TP=2, PP=2, EP=2 (and DP=2 implied by EP's world) give the same losses over several optimizer
  steps as one process (1e-5 relative: only floating-point summation order differs).
- a run killed with SIGKILL and re-run with the same command resumes from the last complete
  checkpoint and reproduces the uninterrupted run's losses exactly (1e-7 relative).
- SIGTERM saves a checkpoint at the current step and exits 0; the re-run continues from it.
- training stage1 leaves every text weight bit-identical and changes the visual parts.
- a run whose loss turns non-finite skips those steps and stops with a clear message.
(Resuming at another layout: tests/training/test_reshard_chain.py.)
Where to look on failure: megatron_navil/training/{trainer,state,checkpoint}.py.
"""

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.training.runner import kill, losses, metrics, pretrain, start_single, wait_for_step

pytestmark = pytest.mark.processes  # every test here starts a process

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_debug_losses.json"
BASE = [
    "--mock-data",
    "--model",
    "debug-internlm2",
    "--seq-length",
    "256",
    "--global-batch-size",
    "2",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--min-lr",
    "1e-4",
    "--log-interval",
    "1",
    "training.seed=7",
    "logging.progress_bar=off",
]


def test_golden_loss_curve(tmp_path):
    m = tmp_path / "m.jsonl"
    pretrain(1, BASE + ["--train-iters", "8", "--metrics-file", str(m)])
    got = [losses(m)[s] for s in range(1, 9)]
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert got == pytest.approx(golden, rel=1e-4), (got, golden)
    assert got[-1] < got[0] - 0.05, "the debug run should learn the mock data's token statistics"


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--pipeline-model-parallel-size", "2"],
        ["--expert-model-parallel-size", "2"],
    ],
    ids=["tp2_sp", "pp2", "ep2_dp2"],
)
def test_parallel_layouts_same_losses(tmp_path, layout):
    # Random initialisation depends on the pipeline split (as in Megatron-LM), so both runs
    # start from the same weights: a 1-step checkpoint loaded with --finetune.
    init, single, par = tmp_path / "init", tmp_path / "single.jsonl", tmp_path / "par.jsonl"
    pretrain(1, BASE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(init)])
    args = BASE + ["--train-iters", "3", "--load", str(init), "--finetune"]
    pretrain(1, args + ["--metrics-file", str(single)])
    pretrain(2, args + layout + ["--metrics-file", str(par)])
    a, b = losses(single), losses(par)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])
    # the slowest DP rank's FLOPs over the mean: 0 with one DP rank (TP/PP peers hold the same
    # batches and must not count twice), >= 0 with two
    dp2 = "--expert-model-parallel-size" in layout
    for r in metrics(par):
        assert r["dp_imbalance"] >= 0 if dp2 else r["dp_imbalance"] == pytest.approx(0, abs=1e-12)
    assert all(r["dp_imbalance"] == pytest.approx(0, abs=1e-12) for r in metrics(single))


def test_sigkill_and_rerun_reproduces_losses(tmp_path):
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    args = BASE + ["--train-iters", "6", "--eval-interval", "3", "--eval-iters", "2"]
    pretrain(1, args + ["--metrics-file", str(full)])
    ck = tmp_path / "ck"
    run = args + ["--save", str(ck), "--save-interval", "2", "--metrics-file", str(resumed)]
    proc = start_single(run, tmp_path / "killed.log")
    wait_for_step(resumed, 4, proc)
    kill(proc)  # SIGKILL: no chance to save
    pretrain(1, run)  # the same command resumes from the latest complete checkpoint
    a = {r["step"]: r for r in metrics(full)}
    b = {r["step"]: r for r in metrics(resumed)}  # later lines overwrite the killed run's
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-7), s
    assert b[6]["valid_loss"] == pytest.approx(a[6]["valid_loss"], rel=1e-7)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    run = BASE + ["--train-iters", "200", "--save", str(ck), "--metrics-file", str(m)]
    proc = start_single(run, tmp_path / "run.log")
    wait_for_step(m, 2, proc)
    out = kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, out[-3000:]
    from megatron_navil.checkpoint import read_latest

    step = read_latest(ck)
    assert step is not None and step >= 2, out[-3000:]
    assert "re-run the same command to resume" in out


def _model_tensors(ckpt_root: Path) -> dict:
    """Canonical (TP=1) model weights of a checkpoint, read through a 1-process model."""
    from tests.training.workers import read_checkpoint_weights

    return read_checkpoint_weights(str(ckpt_root))


def test_stage1_freezes_text_weights(tmp_path, megatron_single_process):
    before, after = tmp_path / "before", tmp_path / "after"
    pretrain(1, BASE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(before)])
    # A new stage starts from the previous stage's weights with a fresh optimizer (--finetune).
    pretrain(
        1,
        BASE
        + [
            "--train-iters",
            "3",
            "--load",
            str(before),
            "--save",
            str(after),
            "--finetune",
            "stage.preset=stage1",
        ],
    )
    w0, w1 = _model_tensors(before), _model_tensors(after)
    from megatron_navil.config import get_flavor
    from megatron_navil.training.stages import classify
    from tests.training.workers import canonical_model

    parts = classify(canonical_model(get_flavor("debug-internlm2")))
    changed = {p: False for p in set(parts.values())}
    for name, part in parts.items():
        same = torch.equal(w0[name], w1[name])
        if part == "text":
            assert same, f"frozen text weight {name} changed"
        changed[part] |= not same
    assert changed["vision"] and changed["visual_experts"] and changed["connector"]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    m = tmp_path / "m.jsonl"
    with pytest.raises(AssertionError) as err:
        pretrain(
            1,
            BASE
            + ["--train-iters", "20", "--lr", "1e12", "--clip-grad", "0", "--metrics-file", str(m)],
        )
    assert "steps in a row had a non-finite loss or gradient norm" in str(err.value)
    rec = metrics(m)
    assert rec[-1]["skipped_steps"] == 3 and rec[-1]["loss"] is None
