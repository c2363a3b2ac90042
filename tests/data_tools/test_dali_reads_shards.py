"""DALI reads what navil-preprocess writes, on CPU, as the training loader will.

Proves: (1) our `.idx` files are byte-identical to what DALI's own `wds2idx` makes from the tar;
(2) `fn.readers.webdataset` with our index reads every sample's image and JSON; (3)
`fn.decoders.image(device="cpu")` decodes every stored image (read by index offset, as the
loader does, multi-image samples included) to 8-bit RGB of exactly the (height, width) the index
records (EXIF orientation applied by DALI's default adjust_orientation=True), with pixels equal
to PIL's decode: exact for PNG/WebP-lossless; JPEG within 1 level mean (two libjpeg builds may
round IDCT/upsampling differently).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

dali = pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (nvidia-dali-cuda1x0)")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.processes
def test_our_idx_equals_wds2idx(reference_run, tmp_path):
    exe = shutil.which("wds2idx") or os.path.join(os.path.dirname(sys.executable), "wds2idx")
    for sh in _manifest(reference_run)["shards"]:
        theirs = tmp_path / "theirs.idx"
        subprocess.run(
            [exe, os.path.join(reference_run, sh["tar"]), str(theirs)],
            check=True,
            capture_output=True,
        )
        ours = open(os.path.join(reference_run, sh["dali_index"])).read()
        assert ours == theirs.read_text(), sh["tar"]


def test_webdataset_reader_reads_all_samples(reference_run):
    shards = _manifest(reference_run)["shards"]
    tars = [os.path.join(reference_run, s["tar"]) for s in shards]
    idxs = [os.path.join(reference_run, s["dali_index"]) for s in shards]
    entries = []
    for s in shards:
        with open(os.path.join(reference_run, s["index"])) as f:
            entries += json.load(f)["samples"]
    single = [e for e in entries if e["num_images"] == 1]

    @pipeline_def(
        batch_size=1,
        num_threads=1,
        device_id=None,
        exec_pipelined=False,
        exec_async=False,
        prefetch_queue_depth=1,
    )
    def pipe():
        img, meta = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg;png;webp", "json"],
            missing_component_behavior="skip",
            random_shuffle=False,
            name="r",
        )
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), meta

    p = pipe()
    p.build()
    n = p.epoch_size("r")
    assert n == len(single)  # samples without exactly one ".{ext}" image member are skipped
    for e in single:
        img, meta = p.run()
        doc = json.loads(np.array(meta[0]).tobytes())
        assert doc["key"] == e["key"]
        im = e["images"][0]
        assert np.array(img[0]).shape == (im["height"], im["width"], 3)


def test_decoder_decodes_every_stored_image_like_pil(reference_run):
    @pipeline_def(
        batch_size=1,
        num_threads=1,
        device_id=None,
        exec_pipelined=False,
        exec_async=False,
        prefetch_queue_depth=1,
    )
    def pipe():
        data = fn.external_source(name="bytes", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    checked = 0
    for sh in _manifest(reference_run)["shards"]:
        with open(os.path.join(reference_run, sh["index"])) as f:
            samples = json.load(f)["samples"]
        with open(os.path.join(reference_run, sh["tar"]), "rb") as f:
            blob = f.read()
        for s in samples:
            for im in s["images"]:
                off, size = s["members"][im["member"]]
                data = blob[off : off + size]
                p.feed_input("bytes", [np.frombuffer(data, np.uint8)])
                (out,) = p.run()
                got = np.array(out[0]).astype(np.float64)
                ref = np.asarray(
                    ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"),
                    dtype=np.float64,
                )
                assert got.shape == (im["height"], im["width"], 3), (s["key"], im)
                err = np.abs(got - ref)
                if im["format"] == "png":
                    assert err.max() == 0, s["key"]
                else:
                    assert err.mean() < 1.0, (s["key"], err.mean())
                checked += 1
    assert checked >= 20
