"""`navil-pretrain --save-hf` on a TP=2 job: each saved checkpoint gets an HF copy beside it
(`<save>/hf_iter_XXXXXXX`), written by rank 0 from the finished checkpoint, and that copy is
byte-identical to what `navil-convert navil-to-hf` (export_hf) writes from the same checkpoint
afterwards: the in-training path adds nothing and misses nothing. `checkpoint.keep_last` prunes a
checkpoint's HF copy together with it. Exact (byte) comparison: both are the same deterministic
conversion of the same stored tensors.
Where to look on failure: megatron_navil/training/trainer.py (_export_hf), checkpoint.prune.
"""

import json

import pytest

from megatron_navil.conversion import export_hf
from tests.checkpoint_tools.conftest import same_files
from tests.training.runner import pretrain
from tests.training.test_pretrain import BASE

pytestmark = pytest.mark.processes  # every test here starts a process


def test_save_hf_writes_the_checkpoints_hf_copy(tmp_path):
    ck = tmp_path / "ck"
    pretrain(
        2,
        BASE
        + [
            "--train-iters",
            "4",
            "--save",
            str(ck),
            "--save-interval",
            "2",
            "--save-hf",
            "--tensor-model-parallel-size",
            "2",
            "checkpoint.keep_last=1",
        ],
    )
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["hf_iter_0000004", "iter_0000004"], names  # step 2 and its copy pruned
    hf = ck / "hf_iter_0000004"
    assert json.loads((hf / "config.json").read_text())["architectures"]
    again = tmp_path / "again"
    export_hf(ck / "iter_0000004", again)
    assert same_files(hf, again) == []
