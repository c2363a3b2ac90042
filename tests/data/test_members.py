"""Tar members a shard reader refuses, and the names it accepts (megatron_navil/data/members.py).

A tar is built with Python's `tarfile` holding one member of every dangerous kind (symbolic
link, hard link, character and block device, FIFO, directory, absolute name, `..` name) next to
a regular file. Proves: the check on the 512-byte header before a member's data (what the loader
and navil-inspect read) accepts exactly the regular file with the indexed name and size, and
refuses every other member with a message naming the tar file and the member; sample keys and
manifest file names with path syntax are refused.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from megatron_navil.data.members import (
    UnsafeMember,
    check_member,
    member_problem,
    safe_file_name,
    safe_key,
)


def _tar(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k-1.json")
        info.size = 5
        tar.addfile(info, io.BytesIO(b'{"a"}'))
        for name, kind, link in (
            ("k-2.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            ("k-3.jpg", tarfile.LNKTYPE, "k-1.json"),
            ("k-4.jpg", tarfile.CHRTYPE, ""),
            ("k-5.jpg", tarfile.BLKTYPE, ""),
            ("k-6.jpg", tarfile.FIFOTYPE, ""),
            ("k-7", tarfile.DIRTYPE, ""),
            ("/abs/k-8.jpg", tarfile.REGTYPE, ""),
            ("a/../../k-9.jpg", tarfile.REGTYPE, ""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    raw = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    return str(path), raw, members


def test_every_dangerous_member_kind_is_refused(tmp_path):
    path, raw, members = _tar(tmp_path)
    expected = {
        "k-1.json": None,
        "k-2.jpg": "is a symbolic link (to '/etc/passwd')",
        "k-3.jpg": "is a hard link (to 'k-1.json')",
        "k-4.jpg": "is a device file",
        "k-5.jpg": "is a device file",
        "k-6.jpg": "is a FIFO",
        "k-7": "is not a regular file",
        "/abs/k-8.jpg": "has an absolute name",
        "a/../../k-9.jpg": "has a '..' component",
    }
    assert [m.name for m in members] == list(expected)  # tarfile kept the names as written
    for m in members:
        header = raw[m.offset : m.offset + 512]
        want = expected[m.name]
        if want is None:
            assert member_problem(m) is None
            check_member(header, path, m.name, m.size)  # accepted
            continue
        assert want in member_problem(m)
        with pytest.raises(UnsafeMember) as e:
            check_member(header, path, m.name, m.size)
        assert path in str(e.value) and repr(m.name) in str(e.value) and want in str(e.value)


def test_header_that_does_not_match_the_index_is_refused(tmp_path):
    path, raw, members = _tar(tmp_path)
    header = raw[members[0].offset : members[0].offset + 512]
    with pytest.raises(UnsafeMember, match="the index does not match the tar"):
        check_member(header, path, "k-2.json", 5)  # another name
    with pytest.raises(UnsafeMember, match="the index does not match the tar"):
        check_member(header, path, "k-1.json", 6)  # another size
    with pytest.raises(UnsafeMember, match="no valid tar header"):
        check_member(raw[512:1024], path, "k-1.json", 5)  # data, not a header


@pytest.mark.parametrize(
    "key, ok",
    [
        ("p00000-000001-000002", True),
        ("abc_DEF-9", True),
        ("../../evil", False),
        ("a/b", False),
        ("a.b", False),
        ("", False),
        (7, False),
        ("x" * 201, False),
    ],
)
def test_sample_keys(key, ok):
    assert safe_key(key) is ok


@pytest.mark.parametrize(
    "name, ok",
    [
        ("shard-p00000-000001.tar", True),
        ("shard-p00000-000001.index.json", True),
        ("../shard.tar", False),
        ("/etc/passwd", False),
        ("sub/shard.tar", False),
        (".hidden.tar", False),
        ("a..b.tar", False),
        (None, False),
    ],
)
def test_manifest_file_names(name, ok):
    assert safe_file_name(name) is ok
