"""navil-preprocess on hostile input: oversized JSON and token counts cost one sample each.

Proves, on tiny JSONL / JSON inputs made here (in-process, --num-workers 0):
- a JSONL line over --max-json-bytes is rejected as `json_too_large` with its source line and
  never parsed, also when it is longer than the reader's chunk (the skip is bounded), and the
  lines after it keep their numbers and are written;
- a JSON-array element under the line rule whose sample JSON member would be over the limit is
  rejected the same way (the limit holds for what is written, whatever the input format);
- a sample whose token count exceeds what its JSON bytes can produce (a tokenizer gone wrong,
  simulated) is rejected as `implausible_tokens`;
- the manifest records max_json_bytes (the loader's limit for the dataset), the accounting
  stays exact (read = written + rejected), and a --max-json-bytes over the loader's cap is a
  one-line usage error;
- a JPEG that PIL decodes but whose header the loader's pre-decode check cannot read (junk
  between markers) is stored converted, and every stored image passes that check.
"""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from data_tools import inputs
from data_tools.preprocess import main
from megatron_navil.data.image_header import check_image_bytes


def _run(out, *args) -> int:
    return main(["--output", str(out), "--num-workers", "0", "--log-every", "1000", *args])


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _rejected(out):
    with open(os.path.join(out, "rejected.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_oversized_json_lines_are_rejected_with_their_line(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "_READ_CHUNK", 1000)  # the long line spans many chunks
    lines = [
        json.dumps({"text": "short one"}),
        json.dumps({"text": "x" * 5000}),  # 5 chunks long
        json.dumps({"text": "y" * 1900}),  # just over: whole line read, then refused
        json.dumps({"text": "fits"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    assert _run(out, "--input", str(tmp_path / "d.jsonl"), "--max-json-bytes", "1900") == 0
    rep = _load(out, "report.json")
    assert rep == {**rep, "read": 4, "written": 2, "rejected": {"json_too_large": 2}}
    rows = _rejected(out)
    assert [r["source"] for r in rows] == [
        {"file": "d.jsonl", "line": 2},
        {"file": "d.jsonl", "line": 3},
    ]
    assert all(r["reason"] == "json_too_large" and "1900" in r["detail"] for r in rows)
    assert "5013 bytes" in rows[0]["detail"]
    assert _load(out, "manifest.json")["settings"]["max_json_bytes"] == 1900
    index = _load(out, "shard-p00000-000000.index.json")
    assert [s["source"]["line"] for s in index["samples"]] == [1, 4]


def test_sample_json_over_the_limit_and_implausible_tokens(tmp_path, tiny_tokenizer, monkeypatch):
    # A JSON array file is loaded whole: the limit applies to the member that would be written.
    records = [{"text": "a cat on a mat"}, {"text": "z" * 3000}, {"text": "the cup"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    from megatron_navil.data import chat_template

    real = chat_template.count_sample_tokens

    def broken(tok, doc, style):  # a tokenizer emitting more ids than bytes for one sample
        return 10**6 if doc.get("text") == "the cup" else real(tok, doc, style)

    monkeypatch.setattr(chat_template, "count_sample_tokens", broken)
    out = tmp_path / "o"
    args = ["--input", str(tmp_path / "d.json"), "--tokenizer", tiny_tokenizer]
    assert _run(out, *args, "--max-json-bytes", "2000") == 0
    rep = _load(out, "report.json")
    assert rep["read"] == 3 and rep["written"] == 1
    assert rep["rejected"] == {"json_too_large": 1, "implausible_tokens": 1}
    rows = {r["source"]["index"]: r for r in _rejected(out)}
    assert rows[1]["reason"] == "json_too_large" and "--max-json-bytes 2000" in rows[1]["detail"]
    assert rows[2]["reason"] == "implausible_tokens" and "1000000 text tokens" in rows[2]["detail"]


def test_max_json_bytes_over_the_loader_cap_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    rc = _run(
        tmp_path / "o", "--input", str(tmp_path / "d.jsonl"), "--max-json-bytes", str(1 << 40)
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --max-json-bytes") and "loader" in err[-1]


def test_stored_images_pass_the_loaders_header_check(tmp_path):
    im = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    clean = buf.getvalue()
    app0 = 4 + int.from_bytes(clean[4:6], "big")
    junk = clean[:app0] + b"\x00\x00\x00" + clean[app0:]  # decoders tolerate this, we do not
    assert check_image_bytes(junk, 10**8) is not None
    (tmp_path / "clean.jpg").write_bytes(clean)
    (tmp_path / "junk.jpg").write_bytes(junk)
    recs = [{"image": "clean.jpg", "text": "clean"}, {"image": "junk.jpg", "text": "junk"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "o"
    assert _run(out, "--input", str(tmp_path / "d.jsonl")) == 0
    index = _load(out, "shard-p00000-000000.index.json")
    conv = {s["images"][0]["path"]: s["images"][0]["converted_from"] for s in index["samples"]}
    assert conv == {"clean.jpg": None, "junk.jpg": "JPEG/RGB"}
    with open(os.path.join(out, index["tar"]), "rb") as f:
        tar = f.read()
    for s in index["samples"]:
        off, size = s["members"][s["images"][0]["member"]]
        assert check_image_bytes(tar[off : off + size], 96 * 64) is None


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_max_json_bytes_must_be_positive(tmp_path, limit, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    assert (
        _run(tmp_path / "o", "--input", str(tmp_path / "d.jsonl"), "--max-json-bytes", limit) == 2
    )
    assert "--max-json-bytes must be >= 1" in capsys.readouterr().err
