"""The three console tools behave as the user-interface contract says.

Proves: every flag has a help string; user-fixable errors (missing path, bad flag combination,
bad tokenizer, not a dataset) exit 2 with one `error:` line naming the thing and no traceback;
non-interactive progress is a periodic log line; the tokenizer CLI trains/wraps/inspects;
preprocess with --tokenizer records text token counts equal to an independent count; and
navil-inspect's statistics agree with report.json and its renderings are real images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from data_tools import inspector, preprocess, tokenizer_cli
from megatron_navil.config import SPECIAL_TOKENS
from megatron_navil.data.tokenizer import NaViLTokenizer
from megatron_navil.utils.progress import Progress
from tests.data_tools.conftest import preprocess_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _actions(parser: argparse.ArgumentParser):
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub in act.choices.values():
                yield from _actions(sub)
        elif not isinstance(act, argparse._HelpAction):
            yield act


@pytest.mark.parametrize("mod", [preprocess, tokenizer_cli, inspector])
def test_every_flag_has_help(mod):
    acts = list(_actions(mod.build_parser()))
    assert acts and all(a.help and len(a.help) > 10 for a in acts), [
        a.dest for a in acts if not a.help
    ]


@pytest.mark.processes
def test_help_runs_as_a_program():
    env = {**os.environ, "PYTHONPATH": REPO}
    for mod in ("preprocess", "tokenizer_cli", "inspector"):
        r = subprocess.run(
            [sys.executable, "-m", f"data_tools.{mod}", "--help"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.processes
def test_missing_input_is_one_clear_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools.preprocess",
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nope.jsonl" in errors[0] and "does not exist" in errors[0]


@pytest.mark.parametrize("case", ["image_root", "output_is_file", "tokenizer", "shard_size"])
def test_bad_preprocess_flags_exit_2(corpus, tmp_path, capsys, case):
    f = tmp_path / "file"
    f.write_text("x")
    extra = {
        "image_root": ["--image-root", str(tmp_path / "none")],
        "output_is_file": [],
        "tokenizer": ["--tokenizer", str(tmp_path / "tok")],
        "shard_size": ["--samples-per-shard", "0"],
    }[case]
    out = str(f) if case == "output_is_file" else str(tmp_path / "o")
    args = preprocess_args(corpus, out) + extra
    assert preprocess.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_other_tools_exit_2_on_bad_input(tmp_path, capsys):
    assert inspector.main([str(tmp_path / "missing")]) == 2
    assert inspector.main([str(tmp_path)]) == 2  # a directory without shards
    (tmp_path / "bad.model").write_bytes(b"junk")
    assert (
        tokenizer_cli.main(
            ["wrap", "--model", str(tmp_path / "bad.model"), "--output", str(tmp_path / "t")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


def test_progress_logs_periodically_when_not_interactive():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("navil.utils.progress")
    log.addHandler(handler)
    try:
        p = Progress("job", log_every_s=0.0, interactive=False)
        p.update(5, written=4)
        p.close()
    finally:
        log.removeHandler(handler)
    assert records and "job: 5 samples" in records[0].getMessage()
    assert "written=4" in records[0].getMessage()


def test_byte_progress_line_counts_gigabytes():
    """The conversions' unit: bytes shown as GB of the total, with the share and the rate."""
    p = Progress("writing", total=4_000_000_000, unit="B", interactive=False, log_every_s=1e9)
    p.update(1_000_000_000)
    assert p.line().startswith("writing: 1.00 / 4.00 GB (25%), ")
    assert p.close() >= 0


def test_tokenizer_cli_train_and_info(corpus, tmp_path, capsys):
    out = str(tmp_path / "tok")
    assert (
        tokenizer_cli.main(
            ["train", "--input", *corpus.inputs, "--vocab-size", "320", "--output", out]
        )
        == 0
    )
    tok = NaViLTokenizer.load(out)
    assert tok.vocab_size <= 320 and tok.first_special_token_id == tok.vocab_size - 12
    meta = json.load(open(os.path.join(out, "navil_tokenizer.json")))
    assert list(meta["special_tokens"]) == list(SPECIAL_TOKENS)
    assert tokenizer_cli.main(["info", out, "--encode", "a <img> b"]) == 0
    assert "<img>" in capsys.readouterr().out


def test_preprocess_records_text_token_counts(corpus, tiny_tokenizer, tmp_path):
    out = str(tmp_path / "o")
    inputs = [p for p in corpus.inputs if p.endswith(("captions.jsonl", "llava.json"))]
    args = [
        "--input",
        *inputs,
        "--output",
        out,
        "--image-root",
        corpus.images,
        "--min-image-side",
        "16",
        "--max-image-pixels",
        "1000000",
        "--num-workers",
        "0",
        "--tokenizer",
        tiny_tokenizer,
        "--chat-template",
        "qwen3",
    ]
    assert preprocess.main(args) == 0
    tok = NaViLTokenizer.load(tiny_tokenizer)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["tokenizer"]["first_special_token_id"] == tok.first_special_token_id
    n = 0
    for sh in man["shards"]:
        idx = json.load(open(os.path.join(out, sh["index"])))
        blob = open(os.path.join(out, sh["tar"]), "rb").read()
        for s in idx["samples"]:
            o, size = s["members"]["json"]
            doc = json.loads(blob[o : o + size])
            if "conversations" in doc:
                want = len(tok.apply_chat_template(doc["conversations"], style="qwen3").ids)
            else:
                want = len(tok.encode(doc["text"], allow_special=False))
            assert s["text_tokens"] == want
            n += 1
    assert n > 10


def test_inspect_stats_and_render(reference_run, tmp_path, capsys):
    js, look = str(tmp_path / "st.json"), str(tmp_path / "look")
    keys = ["p00000-000000-000000"]
    assert (
        inspector.main(
            [reference_run, "--json", js, "--render", "3", "--keys", *keys, "--render-dir", look]
        )
        == 0
    )
    text = capsys.readouterr().out
    st = json.load(open(js))
    rep = json.load(open(os.path.join(reference_run, "report.json")))
    assert st["samples"] == rep["written"] and st["read"] == rep["read"]
    assert st["rejected"] == rep["rejected"] and st["images"] == rep["num_images"]
    assert sum(st["image_longer_side"].values()) == st["images"]
    assert "samples" in text and "rendered 4 sample(s)" in text
    pngs = [n for n in os.listdir(look) if n.endswith(".png")]
    assert len(pngs) in (3, 4) and f"{keys[0]}.png" in pngs
    for n in pngs:
        with Image.open(os.path.join(look, n)) as im:
            assert im.width >= 800 and im.height > 20
    html = open(os.path.join(look, "index.html")).read()
    assert all(n[:-4] in html for n in pngs)
