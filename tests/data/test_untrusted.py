"""Shards from elsewhere are untrusted input: the loader refuses what could hurt it, per sample.

A copy of the test shards is tampered with the way a malicious or broken producer could:
- tar headers before members the index points at are replaced (in place, same offsets) by a
  symbolic link, a hard link, a character device, a FIFO, an absolute name and a `..` name;
- one JPEG's frame header is patched to declare 8000 x 8000 pixels while the index keeps the
  real size (a decompression bomb behind a lying index), another image's index entry claims
  5000 x 5000, and another 6432 x 32 (an aspect ratio NaViL's resize rule cannot size);
- one sample's index claims 10^9 text tokens for a JSON of a few hundred bytes; one sample's
  key is `../../evil`.
Proves: every such sample is skipped and counted (`skipped_samples` for what the index alone
refuses, `corrupt_samples` / `skipped_images` for what its bytes give away), every other sample
still trains, each refusal is logged once with the key (and the tar file and member for header
problems), nothing is decoded past the pixel limit, and training does not stop, whether the
loader reads the tampered indexes converted to the binary index (--reindex) or the JSON
indexes. Also: a manifest naming a file outside the dataset directory is refused as a whole,
and the JSON member limit a manifest records is applied before reading. If this fails, see
megatron_navil/data/members.py, image_header.py, limits.py and index.py (`REFUSALS`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tarfile

import pytest

from megatron_navil.data.index import DataError
from tests.data.corpus import all_index_samples, drop_binary_index, epochs, reindex


def _tar_of(root: str, key: str) -> str:
    part, seg, _ = key.split("-")  # keys are p{partition}-{segment}-{n}
    return os.path.join(root, f"shard-{part}-{seg}.tar")


def _replace_header(root: str, sample: dict, member: str, info: tarfile.TarInfo) -> None:
    """Write `info` as the ustar header right before the member's data."""
    off = sample["members"][member][0]
    block = info.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(block) == 512
    with open(_tar_of(root, sample["key"]), "r+b") as f:
        f.seek(off - 512)
        f.write(block)


def _edit_index(root: str, key: str, edit) -> None:
    with open(os.path.join(root, "manifest.json")) as f:
        shards = json.load(f)["shards"]
    for sh in shards:
        path = os.path.join(root, sh["index"])
        with open(path) as f:
            index = json.load(f)
        for smp in index["samples"]:
            if smp["key"] == key:
                edit(smp)
                with open(path, "w") as f:
                    json.dump(index, f)
                return
    raise KeyError(key)


def _patch_jpeg_size(root: str, sample: dict, member: str, width: int, height: int) -> None:
    """Overwrite the frame header's size of a stored JPEG (same bytes otherwise)."""
    off, size = sample["members"][member]
    with open(_tar_of(root, sample["key"]), "r+b") as f:
        f.seek(off)
        data = f.read(size)
        sof = next(i for i in range(2, size - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
        f.seek(off + sof + 5)  # FF Cx, length (2), precision (1), height, width
        f.write(struct.pack(">HH", height, width))


def _tamper(src: str, dst: str) -> tuple[dict[str, str], dict[str, str]]:
    """Returns ({key: what} refused from the index alone, {key: what} refused from the bytes)."""
    shutil.copytree(src, dst)
    samples = all_index_samples(dst)
    captions = [s for s in samples if s["kind"] == "caption"]
    texts = [s for s in samples if s["kind"] == "text"]
    by_bytes: dict[str, str] = {}
    evil = [
        ("symlink", tarfile.SYMTYPE, None, "/etc/passwd"),
        ("hardlink", tarfile.LNKTYPE, None, "elsewhere.json"),
        ("device", tarfile.CHRTYPE, None, ""),
        ("fifo", tarfile.FIFOTYPE, None, ""),
        ("absolute", tarfile.REGTYPE, "/tmp/{name}", ""),
        ("dotdot", tarfile.REGTYPE, "../../{name}", ""),
    ]
    for (what, kind, name, link), smp in zip(evil, captions):
        member = smp["images"][0]["member"] if what in ("symlink", "absolute") else "json"
        real = f"{smp['key']}.{member}"
        info = tarfile.TarInfo((name or "{name}").format(name=real))
        info.type, info.linkname, info.size = kind, link, smp["members"][member][1]
        if kind != tarfile.REGTYPE:
            info.size = 0
        _replace_header(dst, smp, member, info)
        by_bytes[smp["key"]] = what
    bomb = captions[len(evil)]
    _patch_jpeg_size(dst, bomb, bomb["images"][0]["member"], 8000, 8000)
    by_bytes[bomb["key"]] = "bomb"

    by_index = {}
    claims = captions[len(evil) + 1]
    _edit_index(dst, claims["key"], lambda s: s["images"][0].update(width=5000, height=5000))
    by_index[claims["key"]] = "image_too_large"
    wide = captions[len(evil) + 2]  # NaViL's resize rule stops at aspect ratio 200
    _edit_index(dst, wide["key"], lambda s: s["images"][0].update(width=32 * 201, height=32))
    by_index[wide["key"]] = "image_unsizable"
    _edit_index(dst, texts[0]["key"], lambda s: s.update(text_tokens=10**9))
    by_index[texts[0]["key"]] = "implausible_tokens"
    _edit_index(dst, texts[1]["key"], lambda s: s.update(key="../../evil"))
    by_index["../../evil"] = "unsafe_key"
    return by_index, by_bytes


@pytest.mark.parametrize("source", ["binary", "json"])
def test_tampered_shards_skip_only_the_bad_samples(
    dataset, make_loader, tmp_path, navil_logs, source
):
    """`binary`: the tampered JSON indexes converted by --reindex (the loader checks the binary
    columns); `json`: read directly from the JSON indexes (an output without index/)."""
    clean_loader = make_loader([dataset.root], seq_length=256)
    _, clean = epochs(clean_loader, 1)
    root = str(tmp_path / "tampered")
    by_index, by_bytes = _tamper(dataset.root, root)
    reindex(root) if source == "binary" else drop_binary_index(root)
    all_keys = {s["key"] for s in all_index_samples(root)}
    loader = make_loader([root], seq_length=256)
    batches, counters = epochs(loader, 2)
    for epoch in (0, 1):
        keys = [k for b in batches if b.metadata["epoch"] == epoch for k in b.metadata["keys"]]
        assert sorted(keys) == sorted(all_keys - set(by_index) - set(by_bytes))
    # per epoch: the index refusals are plan-time skips, the others are dropped once read
    assert counters["skipped_samples"] == 2 * (clean["skipped_samples"] + len(by_index))
    assert counters["corrupt_samples"] == 2 * len(by_bytes)
    assert counters["skipped_images"] == 2  # the bomb, once per epoch; nothing was decoded
    warnings = [r.getMessage() for r in navil_logs.records if r.levelname == "WARNING"]
    per_key = [w for w in warnings if "refused" in w and "as untrusted input" not in w]
    assert len(per_key) == len(by_index) + len(by_bytes), warnings  # once each, not per epoch
    for key, what in {**by_index, **by_bytes}.items():
        (line,) = [w for w in per_key if key in w]
        if what in by_index.values():
            assert what in line
        elif what == "bomb":
            assert "8000x8000" in line and "more than the limit" in line
        else:
            assert os.path.basename(_tar_of(root, key)) in line, line  # names the tar
            phrase = {
                "symlink": "symbolic link",
                "hardlink": "hard link",
                "device": "device file",
                "fifo": "FIFO",
                "absolute": "absolute name",
                "dotdot": "'..' component",
            }[what]
            assert phrase in line, line
    assert any("samples refused as untrusted input" in w for w in warnings)


def test_manifest_naming_files_outside_the_dataset_is_refused(dataset, make_loader, tmp_path):
    for n, bad in enumerate(("../elsewhere.tar", "/etc/passwd", "sub/dir.tar")):
        root = str(tmp_path / f"m{n}")
        shutil.copytree(dataset.root, root)
        path = os.path.join(root, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["shards"][0]["tar"] = bad
        with open(path, "w") as f:
            json.dump(manifest, f)
        drop_binary_index(root)  # the JSON path reads the manifest's shard list
        with pytest.raises(DataError, match="not a plain file name") as e:
            make_loader([root], seq_length=256)
        assert path in str(e.value) and bad in str(e.value)
        with pytest.raises(AssertionError):  # --reindex refuses it too (exit status 2)
            reindex(root)


def test_json_member_limit_from_the_manifest(dataset, make_loader, tmp_path, navil_logs):
    """A dataset made with --max-json-bytes N: the loader skips samples whose JSON member is
    larger (here N is lowered after the fact, as a tampered index would claim big members)."""
    root = str(tmp_path / "small_json")
    shutil.copytree(dataset.root, root)
    samples = all_index_samples(root)
    sizes = sorted(s["members"]["json"][1] for s in samples)
    limit = sizes[len(sizes) // 2]
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["settings"]["max_json_bytes"] = limit
    with open(path, "w") as f:
        json.dump(manifest, f)
    reindex(root)
    big = {s["key"] for s in samples if s["members"]["json"][1] > limit}
    assert 0 < len(big) < len(samples)
    batches, _ = epochs(make_loader([root], seq_length=256), 1)
    seen = {k for b in batches for k in b.metadata["keys"]}
    assert seen == {s["key"] for s in samples} - big
    logged = " ".join(r.getMessage() for r in navil_logs.records)
    assert all(k in logged for k in big) and "json_too_large" in logged
