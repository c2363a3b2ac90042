"""Streaming safetensors I/O: files the safetensors library reads back exactly; validation that
names the offending file/tensor before anything is converted.

- the planned, streamed writer produces shards no larger than the limit (unless one tensor is
  larger), an index listing every tensor, and files `safetensors.safe_open` reads to identical
  tensors (fp32, bf16, mixed);
- the reader (plain reads, no mmap) returns identical tensors for files written by the library;
- truncated file, corrupt header, index naming a missing shard or a tensor its shard lacks,
  duplicate tensors across shards, shards not in the index: each a ConversionError naming the
  file and tensor. Writing out of plan order is refused.
Exact comparisons: bytes are copied, never converted.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.safetensors_io import (
    INDEX_FILE,
    SafetensorsDir,
    ShardedSafetensorsWriter,
    read_header,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.bias": torch.randn(7, generator=g),
        "c.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "d.scale": torch.randn(3, 5, 2, generator=g),
        "e.big": torch.randn(300, 40, generator=g),
    }


def _write(path, tensors, max_bytes):
    w = ShardedSafetensorsWriter(
        path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_bytes
    )
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return w


def test_streamed_shards_read_back_with_the_library(tmp_path):
    tensors = _tensors()
    w = _write(tmp_path, tensors, max_bytes=5_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert len(w.files) > 2
    for f in w.files:
        shard = [k for k, v in index["weight_map"].items() if v == f]
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in shard)
        assert size <= 5_000 or len(shard) == 1  # only a single oversized tensor may exceed it
        with safe_open(str(tmp_path / f), "pt") as sf:
            assert set(sf.keys()) == set(shard)
            for k in shard:
                assert (
                    torch.equal(sf.get_tensor(k), tensors[k])
                    and sf.get_tensor(k).dtype == tensors[k].dtype
                )
    ours = SafetensorsDir(tmp_path)
    assert all(torch.equal(ours.load(k), v) for k, v in tensors.items())


def test_reader_reads_library_files(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = SafetensorsDir(tmp_path)
    assert sorted(src.names()) == sorted(tensors)
    for k, v in tensors.items():
        assert src.info(k) == (tuple(v.shape), v.dtype) and torch.equal(src.load(k), v)


def test_write_order_is_enforced(tmp_path):
    t = _tensors()
    w = ShardedSafetensorsWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in t.items()])
    with pytest.raises(RuntimeError, match="expected a.weight"):
        w.write("b.bias", t["b.bias"])
    w.abort()


def test_truncated_file_names_file_and_tensor(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        ConversionError, match=r"model.safetensors is truncated: \d+ bytes, but tensor '.+' ends"
    ):
        SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:20])
    with pytest.raises(
        ConversionError, match="model.safetensors is truncated or not a safetensors file"
    ):
        read_header(tmp_path / "model.safetensors")


def test_corrupt_header(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(
        (16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 8
    )
    with pytest.raises(ConversionError, match="x.safetensors: corrupt safetensors header"):
        SafetensorsDir(tmp_path)


def test_index_problems_are_named(tmp_path):
    t = _tensors()
    _write(tmp_path, t, max_bytes=10_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).rename(tmp_path / "gone.bin")
    with pytest.raises(ConversionError, match=f"lists {first}, which is missing"):
        SafetensorsDir(tmp_path)
    (tmp_path / "gone.bin").rename(tmp_path / first)
    other = sorted(set(index["weight_map"].values()))[1]
    moved = dict(index, weight_map=dict(index["weight_map"], **{"a.weight": other}))
    (tmp_path / INDEX_FILE).write_text(json.dumps(moved))
    with pytest.raises(ConversionError, match=f"says 'a.weight' is in {other}"):
        SafetensorsDir(tmp_path)
    fewer = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != "b.bias"})
    (tmp_path / INDEX_FILE).write_text(json.dumps(fewer))
    with pytest.raises(ConversionError, match="holds 'b.bias' .* not listed in"):
        SafetensorsDir(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ConversionError, match="tensor 'x' is in both"):
        SafetensorsDir(tmp_path)
