"""The tokenizer travels with the model: navil-pretrain copies the tokenizer it trains with into
every checkpoint (`iter_*/tokenizer/`, its sha256 in navil_checkpoint.json), so the HF export
(`--save-hf` and a later `navil-convert navil-to-hf` without --tokenizer) includes it and passes
the release check; resuming with another tokenizer is refused in one message naming both, and
the checkpoint is untouched. Exact (byte) comparisons.
Where to look on failure: megatron_navil/checkpoint/ (save, tokenizer_digest),
trainer.py (_check_tokenizer), conversion/to_hf.py (checkpoint_tokenizer).
"""

from __future__ import annotations

import json

import pytest

from megatron_navil.conversion.release import check_release
from megatron_navil.data.tokenizer import train_sentencepiece
from tests.checkpoint_tools.conftest import run_cli
from tests.training.runner import pretrain
from tests.training.test_pretrain import BASE

pytestmark = pytest.mark.processes  # every test here starts a process

WORDS = (
    "a photo of the cat coffee cup rocket camera man standing near with red blue green "
    "small large image picture showing on in at day night"
).split()


def _tokenizer(path, seed_word: int):
    texts = [
        " ".join(WORDS[(seed_word * k + j * 3) % len(WORDS)] for j in range(6 + k % 9)) + "."
        for k in range(300)
    ]
    tok = train_sentencepiece(texts, vocab_size=300)
    tok.save(str(path))
    return tok


def test_checkpoint_carries_its_tokenizer(tmp_path):
    _tokenizer(tmp_path / "tok", 7)
    ck = tmp_path / "ck"
    # no vocabulary overrides: the model follows the tokenizer (test_vocab_from_tokenizer.py)
    args = BASE + ["--tokenizer-model", str(tmp_path / "tok"), "--save", str(ck)]
    pretrain(1, args + ["--train-iters", "2", "--save-hf"])
    it = ck / "iter_0000002"
    names = sorted(p.name for p in (it / "tokenizer").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "tok").iterdir())
    for n in names:
        assert (it / "tokenizer" / n).read_bytes() == (tmp_path / "tok" / n).read_bytes()
    assert len(json.loads((it / "navil_checkpoint.json").read_text())["tokenizer_sha256"]) == 64

    hf_copy = ck / "hf_iter_0000002"
    assert (hf_copy / "tokenizer.model").read_bytes() == (
        tmp_path / "tok/tokenizer.model"
    ).read_bytes()
    assert check_release(hf_copy) == []
    rc, out, _ = run_cli(
        ["navil-to-hf", "--load", ck, "--output", tmp_path / "hf", "--no-progress"]
    )
    assert rc == 0 and "release check OK" in out, out
    assert (tmp_path / "hf/tokenizer.model").exists()

    # resuming (the same command) with another tokenizer is refused, checkpoint untouched
    _tokenizer(tmp_path / "other", 5)
    before = {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    bad = BASE + [
        "--tokenizer-model",
        str(tmp_path / "other"),
        "--save",
        str(ck),
        "--train-iters",
        "3",
    ]
    with pytest.raises(AssertionError) as err:
        pretrain(1, bad)
    msg = str(err.value)
    assert "was trained with another tokenizer than --tokenizer-model" in msg, msg[-3000:]
    assert "Traceback" not in msg, msg[-3000:]
    assert {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()} == before
    pretrain(1, args + ["--train-iters", "3"])  # the right tokenizer resumes
