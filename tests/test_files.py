"""The one atomic writer (megatron_navil/utils/files.py): a reader sees the old file or the whole
new one, a failed write leaves the old file and no temporary, and the text, bytes and JSON
helpers write exactly what they are given."""

from __future__ import annotations

import json

import pytest

from megatron_navil.utils.files import (
    atomic_writer,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_writer(path) as f:
            f.write("half of the new")
            assert path.read_text() == "old\n"  # not visible until the block ends
            raise OSError(28, "disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_helpers_write_what_they_are_given(tmp_path):
    write_bytes_atomic(tmp_path / "m.model", b"\x00\xffproto")
    write_json_atomic(tmp_path / "meta.json", {"piece": "é", "n": 1}, indent=2)
    assert (tmp_path / "m.model").read_bytes() == b"\x00\xffproto"
    text = (tmp_path / "meta.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text) == {"piece": "é", "n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "meta.json"]
