"""navil-preprocess accounts for every input exactly and stores what it promises.

Proves: read = written + sum(rejected) and every rejection reason matches an independent list of
what each generated input must get (tests/data_tools/corpus.py); rejected.jsonl names every
rejected input; accepted images are stored as original bytes or converted exactly as the
corpus expects; index offsets point at the right bytes; sizes are after EXIF orientation;
JSON members hold the input text. When it fails, compare report.json / rejected.jsonl of the
run with Corpus.expected.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageOps

from tests.data_tools.corpus import source_id


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _samples(out):
    man = _load(out, "manifest.json")
    for sh in man["shards"]:
        idx = _load(out, sh["index"])
        for s in idx["samples"]:
            yield sh, s


def test_report_accounting_is_exact(corpus, reference_run):
    rep = _load(reference_run, "report.json")
    exp = corpus.expected_counts(dedup=True)
    assert rep["read"] == exp["read"]
    assert rep["written"] == exp["written"]
    assert rep["rejected"] == exp["rejected"]
    assert rep["read"] == rep["written"] + sum(rep["rejected"].values())
    # Every reason code of the issue is exercised by the corpus.
    assert set(rep["rejected"]) >= {
        "missing_file",
        "zero_byte",
        "corrupt_image",
        "unsupported_format",
        "image_too_small",
        "image_too_large",
        "malformed_json",
        "empty_text",
        "placeholder_mismatch",
    }


def test_rejected_jsonl_lists_each_rejected_input_with_its_reason(corpus, reference_run):
    with open(os.path.join(reference_run, "rejected.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    got = {source_id(r["source"]): r["reason"] for r in rows}
    want = {k: v for k, v in corpus.expected.items() if v is not None}
    assert got == want
    assert len(rows) == len(want)  # no input listed twice


def test_written_samples_are_exactly_the_good_inputs(corpus, reference_run):
    got = sorted(source_id(s["source"]) for _, s in _samples(reference_run))
    want = sorted(k for k, v in corpus.expected.items() if v is None)
    assert got == want
    keys = [s["key"] for _, s in _samples(reference_run)]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)


def test_stored_bytes_roundtrip_and_metadata(corpus, reference_run):
    seen_conversions = {}
    for sh, s in _samples(reference_run):
        tar_path = os.path.join(reference_run, sh["tar"])
        with open(tar_path, "rb") as f:
            blob = f.read()
        doc = json.loads(_member(blob, s, "json"))
        assert doc["key"] == s["key"] and doc["kind"] == s["kind"]
        assert len(doc["images"]) == s["num_images"] == len(s["images"])
        for im, jm in zip(s["images"], doc["images"]):
            data = _member(blob, s, im["member"])
            name = os.path.basename(im["path"])
            src = os.path.join(corpus.images, name)
            if not os.path.exists(src):  # image-folder sample
                src = os.path.join(corpus.root, s["source"]["file"])
            with open(src, "rb") as f:
                original = f.read()
            ref = ImageOps.exif_transpose(Image.open(io.BytesIO(original)))
            # width/height are after EXIF orientation, in the index and the JSON member alike
            assert (im["width"], im["height"]) == ref.size == (jm["width"], jm["height"])
            if name in corpus.converted:
                assert im["converted_from"] == corpus.converted[name], name
            seen_conversions[name] = im["converted_from"]
            if im["converted_from"] is None:
                assert data == original, f"{name}: original bytes must be stored unchanged"
            else:
                assert im["orientation"] == 1 and im["format"] in ("jpg", "png")
                lossy = im["source_format"] in ("JPEG", "MPO")
                assert im["format"] == ("jpg" if lossy else "png")
                stored = Image.open(io.BytesIO(data))
                assert stored.mode == "RGB" and stored.size == ref.size
                _check_conversion(name, np.asarray(stored), ref, lossy)
    # The corpus' interesting cases all reached a shard.
    assert {"rot6.jpg", "cmyk.jpg", "gray16.png", "rgba.png", "anim.gif", "rot8.png"} <= set(
        seen_conversions
    )


def _member(blob: bytes, s: dict, member: str) -> bytes:
    off, size = s["members"][member]
    return blob[off : off + size]


def _check_conversion(name, got: np.ndarray, ref: Image.Image, lossy: bool) -> None:
    """Converted pixels vs an independent conversion. Lossless -> PNG must be exact;
    lossy sources are re-encoded at JPEG q95 4:4:4: mean error < 2 levels of 255."""
    if ref.mode in ("RGBA", "LA", "PA") or (ref.mode == "P" and "transparency" in ref.info):
        rgba = np.asarray(ref.convert("RGBA"), dtype=np.float64)
        a = rgba[..., 3:4] / 255.0
        want = np.round(rgba[..., :3] * a + 255.0 * (1 - a))
    elif ref.mode.startswith("I;16"):
        want = np.repeat(np.round(np.asarray(ref, dtype=np.float64) / 257.0)[..., None], 3, -1)
    else:
        want = np.asarray(ref.convert("RGB"), dtype=np.float64)
    err = np.abs(got.astype(np.float64) - want)
    if lossy:
        assert err.mean() < 2.0, (name, err.mean())
    else:
        # alpha compositing may round differently by one level (PIL integer math vs float)
        assert err.max() <= 1.0, (name, err.max())


def test_tar_is_a_valid_webdataset_and_index_matches_tar_headers(reference_run):
    man = _load(reference_run, "manifest.json")
    assert man["num_samples"] == sum(sh["num_samples"] for sh in man["shards"])
    for sh in man["shards"]:
        idx = _load(reference_run, sh["index"])
        with tarfile.open(os.path.join(reference_run, sh["tar"])) as tf:
            members = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
        want = {}
        for s in idx["samples"]:
            for ext, (off, size) in s["members"].items():
                want[f"{s['key']}.{ext}"] = (off, size)
        assert members == want
        assert os.path.getsize(os.path.join(reference_run, sh["tar"])) == sh["tar_bytes"]
        assert len(idx["samples"]) <= 4  # --samples-per-shard 4


def test_max_shard_bytes_is_respected(corpus, tmp_path):
    from data_tools.preprocess import main
    from tests.data_tools.conftest import preprocess_args

    out = str(tmp_path / "o")
    limit = 40_000  # a few of the ~5-25 kB samples per shard
    args = preprocess_args(corpus, out, "--num-workers", "0", "--max-shard-bytes", str(limit))
    args[args.index("--samples-per-shard") + 1] = "1000"
    assert main(args) == 0
    man = _load(out, "manifest.json")
    assert man["num_samples"] == corpus.expected_counts()["written"]
    assert len(man["shards"]) > 3
    for sh in man["shards"]:
        assert sh["tar_bytes"] <= limit or sh["num_samples"] == 1, sh


def test_whole_json_file_errors_are_counted_once(tmp_path):
    from data_tools.preprocess import main

    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"text": ')
    (tmp_path / "obj.json").write_text('{"text": "a single object is one record"}')
    (tmp_path / "num.json").write_text("42")
    out = str(tmp_path / "o")
    for k in (1, 3):  # the same whatever the partitioning
        o = f"{out}{k}"
        for i in range(k):
            assert (
                main(
                    [
                        "--input",
                        str(tmp_path / "*.json"),
                        "--output",
                        o,
                        "--num-workers",
                        "0",
                        "--num-partitions",
                        str(k),
                        "--partition-index",
                        str(i),
                    ]
                )
                == 0
            )
        rep = _load(o, "report.json")
        assert rep["read"] == 3 and rep["written"] == 1
        assert rep["rejected"] == {"malformed_json": 1, "malformed_record": 1}
