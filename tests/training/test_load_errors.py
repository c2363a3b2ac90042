"""navil-pretrain refuses checkpoints it cannot use, with one message that names the problem and
leaves the checkpoint untouched:
- a checkpoint of another model shape (`--load` with a different layer count / hidden size)
  names each differing config field, checkpoint value vs config value;
- a `latest` pointer at an incomplete save names the step and directory;
- a stage that froze parts, resumed by a run that trains them, says optimizer state is what
  is missing (how many, the first few) and to start the new stage with --finetune.
Where to look on failure: megatron_navil/checkpoint/ (check_model_config, resolve).
"""

import hashlib

import pytest

from tests.training.runner import pretrain
from tests.training.test_pretrain import BASE

pytestmark = pytest.mark.processes  # every test here starts a process


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    ck = tmp_path / "ck"
    pretrain(1, BASE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(ck)])
    before = _digest(ck)
    with pytest.raises(AssertionError) as err:
        pretrain(
            1,
            BASE
            + [
                "--train-iters",
                "2",
                "--load",
                str(ck),
                "model.llm.num_layers=2",
                "model.llm.hidden_size=128",
            ],
        )
    msg = str(err.value)
    assert "was saved for a different model" in msg, msg[-3000:]
    assert "llm.num_layers: checkpoint 4 vs config 2" in msg, msg[-3000:]
    assert "llm.hidden_size" in msg and "Traceback" not in msg, msg[-3000:]
    assert _digest(ck) == before

    (ck / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(AssertionError) as err:
        pretrain(1, BASE + ["--train-iters", "2", "--load", str(ck)])
    assert "points at step 7" in str(err.value), str(err.value)[-3000:]


def test_stage_that_froze_parts_is_named_when_resumed_training_them(tmp_path):
    """A stage-1 checkpoint (text frozen: no optimizer state for it) resumed as a full-training
    run: a few lines saying optimizer state is what is missing, how many, and to use
    --finetune; the checkpoint untouched."""
    ck = tmp_path / "ck"
    pretrain(1, BASE + ["--train-iters", "2", "--save", str(ck), "stage.preset=stage1"])
    before = _digest(ck)
    with pytest.raises(AssertionError) as err:
        pretrain(1, BASE + ["--train-iters", "3", "--save", str(ck)])
    msg = str(err.value)
    line = next(x for x in msg.splitlines() if "error:" in x)
    assert "the checkpoint lacks optimizer state for" in line and "--finetune" in line, line
    assert "optimizer.state.exp_avg.language_model" in line and "Traceback" not in msg
    assert _digest(ck) == before
