"""Damaged or crafted checkpoint files are named, never loaded (megatron_navil/checkpoint/
integrity.py):

- a `.metadata` pickle that asks for anything but checkpoint-metadata classes is refused before
  any library unpickles it, and its payload never runs; a real one (Megatron's or our streaming
  writer's) reads back;
- CRC32 digests recorded at save catch what torch.load cannot: a flipped byte inside a stored
  tensor (torch loads it silently as a wrong weight), as well as truncation and missing files;
- `find_corrupt_item` names the file and key of a stored tensor whose bytes no longer decode.
The end-to-end path (the trainer refusing a damaged latest checkpoint, then resuming from an
earlier one) is tests/training/test_faults.py.
"""

import io
import os
import pickle

import pytest
import torch

from megatron_navil.checkpoint import CheckpointError, integrity
from tests.checkpoint_tools.test_dist_io import _weights, _write


class _Payload:
    """Unpickling this runs os.system: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    with pytest.raises(
        CheckpointError, match=r"\.metadata is not checkpoint metadata \(\w+\.system is not allowed"
    ):
        integrity.read_storage_metadata(tmp_path)
    assert not marker.exists()


@pytest.fixture
def streamed(tmp_path, megatron_single_process):
    cfg, weights = _weights()
    return _write(tmp_path, cfg, weights)


def test_real_metadata_reads_back(streamed):
    md = integrity.read_storage_metadata(streamed)
    assert md.state_dict_metadata and md.storage_data
    integrity.check_files(streamed, md)


def _biggest_item(d):
    md = integrity.read_storage_metadata(d)
    tensors = {k for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    items = [(i, s) for i, s in md.storage_data.items() if i.fqn in tensors]
    return max(items, key=lambda x: x[1].length)


def test_digests_catch_a_flipped_byte_that_torch_load_accepts(streamed):
    recorded = integrity.record_digests(streamed)
    assert "__0_0.distcp" in recorded and ".metadata" in recorded
    integrity.verify_digests(streamed, recorded)  # unchanged: passes

    index, info = _biggest_item(streamed)
    path = streamed / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length - 16] ^= 0xFF  # inside the tensor's bytes, near its end
    path.write_bytes(bytes(data))
    item = io.BytesIO(bytes(data[info.offset : info.offset + info.length]))
    torch.load(item, weights_only=True)  # the premise: torch does not notice
    with pytest.raises(CheckpointError, match=rf"{info.relative_path} is corrupt \(CRC32"):
        integrity.verify_digests(streamed, recorded)

    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=rf"{info.relative_path} has \d+ bytes"):
        integrity.verify_digests(streamed, recorded)
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{info.relative_path} is missing"):
        integrity.verify_digests(streamed, recorded)


def test_find_corrupt_item_names_file_and_key(streamed):
    md = integrity.read_storage_metadata(streamed)
    assert integrity.find_corrupt_item(streamed, md) is None
    index, info = _biggest_item(streamed)
    path = streamed / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset : info.offset + 64] = b"\0" * 64  # the item's zip header
    path.write_bytes(bytes(data))
    where = integrity.find_corrupt_item(streamed, md)
    assert where == f"{path} (key {index.fqn})"
