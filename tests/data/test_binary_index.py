"""The binary, memory-mapped dataset index (megatron_navil/data/binindex.py, columns.py).

Proves: the index navil-preprocess writes (concatenated shard pieces) and the one
`navil-preprocess --reindex` makes from the JSON indexes hold exactly the columns the JSON reader
builds (every array with its dtype, every key, member and tar name, refusal details, the
fingerprint), and the loader yields bit-identical batches from the binary and the JSON index;
--reindex never reads a tar (it works with every tar's bytes zeroed); the columns are views of
one read-only mapping (no private copy); a binary index built for another manifest, of another
version or cut short is refused in one line that says to run --reindex; hostile binary columns
(offsets past the tar, lying token counts, unsafe key bytes, a shard name outside the directory)
are refused per sample or as a whole, like the JSON ones; a missing or resized shard tar is
refused in one line naming the manifest and the file. If this fails, see binindex.py (layout),
columns.py (PieceBuilder) and costs.py (per-sample checks).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil

import numpy as np
import pytest

from megatron_navil.data.columns import REFUSALS
from megatron_navil.data.costs import CostModel
from megatron_navil.data.index import DataError, load_dataset
from megatron_navil.data.sizing import ImageSizer
from tests.data.corpus import drop_binary_index, epochs, reindex
from tests.data.test_resume import assert_same_batch


def _copy(src: str, dst: str, binary: bool = True) -> str:
    shutil.copytree(src, dst)
    if not binary:
        drop_binary_index(dst)
    return dst


def assert_same_index(a, b) -> None:
    ca, cb = a.cols, b.cols
    assert set(ca.arrays) == set(cb.arrays)
    for k in ca.arrays:
        x, y = ca.arrays[k], cb.arrays[k]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k
    for k in ca.strings:
        assert ca.strings[k].to_list() == cb.strings[k].to_list(), k
    assert ca.entry_detail == cb.entry_detail
    assert a.fingerprint == b.fingerprint
    assert list(a.tars[s] for s in range(len(a.tars))) == list(
        b.tars[s] for s in range(len(b.tars))
    )


def test_binary_and_json_index_are_equal(dataset, tok, tmp_path):
    root = _copy(dataset.root, str(tmp_path / "ds"))
    binary = load_dataset(root, tok, "internlm2")
    assert binary.source == "binary"
    js = load_dataset(_copy(root, str(tmp_path / "js"), binary=False), tok, "internlm2")
    assert js.source == "json"
    # the same tars: compare with paths relative to each root
    binary.root = js.root = ""
    binary.tars.root = js.tars.root = ""
    assert_same_index(binary, js)
    keys = binary.cols.strings["keys"].to_list()
    assert len(keys) == len(set(keys)) == len(binary) > 20
    assert binary.cols.arrays["digest"].any(axis=1).all()  # every sample's digest recorded


def test_loader_batches_are_bit_identical(dataset, make_loader, tmp_path):
    js = _copy(dataset.root, str(tmp_path / "js"), binary=False)
    a, _ = epochs(make_loader([dataset.root], prefetch_depth=0), 2)
    b, _ = epochs(make_loader([js], prefetch_depth=0), 2)
    assert len(a) == len(b) > 4
    for x, y in zip(a, b):
        assert_same_batch(x, y)


def test_reindex_reads_no_tar_and_equals_the_written_index(dataset, tok, tmp_path):
    root = _copy(dataset.root, str(tmp_path / "ds"))
    written = load_dataset(root, tok, "internlm2")
    for name in os.listdir(root):
        if name.endswith(".tar"):  # same size, no content: --reindex must not need it
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.truncate(size)
    drop_binary_index(root)
    reindex(root)
    again = load_dataset(root, tok, "internlm2")
    assert again.source == "binary"
    assert_same_index(written, again)


def test_columns_are_views_of_one_shared_mapping(dataset, tok):
    ds = load_dataset(dataset.root, tok, "internlm2")
    for k, arr in ds.cols.arrays.items():
        base = arr
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.obj if isinstance(base, memoryview) else base.base
        assert isinstance(base, mmap.mmap), k  # file pages, not a private copy
        assert not arr.flags.writeable, k


def _edit_file(path: str, edit) -> None:
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(edit(text))


def test_stale_or_damaged_binary_index_is_refused(dataset, tok, tmp_path):
    root = _copy(dataset.root, str(tmp_path / "stale"))
    _edit_file(os.path.join(root, "manifest.json"), lambda t: t + "\n")
    with pytest.raises(DataError, match="another manifest.json.*--reindex") as e:
        load_dataset(root, tok, "internlm2")
    assert "\n" not in str(e.value)

    root = _copy(dataset.root, str(tmp_path / "version"))
    meta = os.path.join(root, "index", "meta.json")
    _edit_file(meta, lambda t: t.replace('"version": 1', '"version": 99'))
    with pytest.raises(DataError, match="version 99.*--reindex"):
        load_dataset(root, tok, "internlm2")

    root = _copy(dataset.root, str(tmp_path / "short"))
    cols = os.path.join(root, "index", "columns.bin")
    os.truncate(cols, os.path.getsize(cols) // 2)
    with pytest.raises(DataError, match="outside the file.*--reindex"):
        load_dataset(root, tok, "internlm2")


def _column(root: str, name: str) -> tuple[str, int, np.dtype]:
    with open(os.path.join(root, "index", "meta.json")) as f:
        spec = json.load(f)["columns"][name]
    return os.path.join(root, "index", "columns.bin"), spec["offset"], np.dtype(spec["dtype"])


def _poke(root: str, name: str, row: int, value) -> None:
    path, offset, dtype = _column(root, name)
    with open(path, "r+b") as f:
        f.seek(offset + row * dtype.itemsize)
        f.write(np.asarray([value], dtype=dtype).tobytes())


def test_hostile_binary_columns_are_refused(dataset, tok, cfg, tmp_path, make_loader):
    root = _copy(dataset.root, str(tmp_path / "hostile"))
    ds = load_dataset(root, tok, "internlm2")
    text = [int(i) for i in np.nonzero(np.asarray(ds.kind) == 3)[0]]
    images = [int(i) for i in np.nonzero(np.diff(np.asarray(ds.image_start)) == 1)[0]]
    want = {
        text[0]: "malformed_entry",  # its JSON member ends past the tar
        text[1]: "implausible_tokens",
        text[2]: "unsafe_key",
        images[0]: "malformed_entry",  # its image offset lies inside the tar's first header
    }
    _poke(root, "json_offset", text[0], int(ds.shard_tar_bytes[ds.shard[text[0]]]) - 10)
    _poke(root, "text_tokens", text[1], 10**9)
    key_path, key_off, _ = _column(root, "keys.bytes")
    with open(key_path, "r+b") as f:
        f.seek(key_off + int(ds.cols.strings["keys"].offsets[text[2]]))
        f.write(b"../")
    _poke(root, "image_offset", int(ds.image_start[images[0]]), 100)
    ds = load_dataset(root, tok, "internlm2")
    model = CostModel([ds], ImageSizer(cfg, False), True, 10**8, 64)
    codes = model.window(np.arange(len(ds))).refused
    got = {int(i): REFUSALS[c] for i, c in enumerate(codes.tolist()) if c}
    assert got == want
    assert "past" not in model.why(text[1]) and "10000000" in model.why(text[1])
    batches, counters = epochs(make_loader([root]), 1)
    seen = {k for b in batches for k in b.metadata["keys"]}
    assert not seen & {ds.key(i) for i in want}
    assert counters["skipped_samples"] >= len(want)

    # a shard name outside the directory refuses the dataset as a whole
    names_path, names_off, _ = _column(root, "shard_tar.bytes")
    with open(names_path, "r+b") as f:
        f.seek(names_off)
        f.write(b"../")
    with pytest.raises(DataError, match="not a plain file name"):
        load_dataset(root, tok, "internlm2")


@pytest.mark.parametrize("binary", [True, False])
def test_missing_or_resized_shard_is_refused(dataset, tok, tmp_path, binary):
    root = _copy(dataset.root, str(tmp_path / "gone"), binary)
    manifest = os.path.join(root, "manifest.json")
    tar = os.path.join(root, sorted(n for n in os.listdir(root) if n.endswith(".tar"))[1])
    os.remove(tar)
    with pytest.raises(DataError, match="is missing") as e:
        load_dataset(root, tok, "internlm2")
    assert manifest in str(e.value) and tar in str(e.value) and "\n" not in str(e.value)
    root = _copy(dataset.root, str(tmp_path / "resized"), binary)
    tar = os.path.join(root, os.path.basename(tar))
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match="bytes, the manifest records") as e:
        load_dataset(root, tok, "internlm2")
    assert tar in str(e.value)
