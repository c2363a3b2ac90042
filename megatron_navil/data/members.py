"""Which shard files and tar members a reader accepts: shards are untrusted input.

Readers (the loader, navil-inspect) never extract a tar: they read a member's bytes at the offset
its index gives. A shard from elsewhere can still point a reader at anything, so before any
bytes are used:
- file names in manifest.json / an index (`tar`, `index`, `dali_index`) must be plain names
  inside the dataset directory (no path separator, no `..`, not absolute, not hidden);
- sample keys must be `[A-Za-z0-9_-]` only (WebDataset splits member names at the first dot;
  a key is also used in log lines and in navil-inspect's output file names);
- the 512-byte ustar header right before a member's data is read with the data and must
  describe a regular file named `key.suffix` of exactly the indexed size. A member with an
  absolute name, a `..` component, a symbolic or hard link, a device file or a FIFO is refused
  with an error naming the tar file and the member.
navil-preprocess writes plain ustar headers (no PAX / GNU long-name records), so the header
before the data is always the member's own.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import PurePosixPath
from typing import Optional

HEADER_BYTES = tarfile.BLOCKSIZE
"""A ustar member header precedes its data: 512 bytes."""
_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}")


class UnsafeMember(ValueError):
    """A tar member a reader must not use; the message names the tar file and the member."""


def safe_key(key: object) -> bool:
    """A sample key navil-preprocess could have written (no dots, slashes or `..`)."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def safe_file_name(name: object) -> bool:
    """A plain file name inside its directory (what manifest.json and indexes list)."""
    return isinstance(name, str) and _FILE.fullmatch(name) is not None and ".." not in name


def member_problem(info: tarfile.TarInfo) -> Optional[str]:
    """Why a member must not be read or extracted (None: a regular file with a relative,
    contained name)."""
    name = info.name
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "has an absolute name"
    if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
        return "has a '..' component"
    if info.issym():
        return f"is a symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"is a hard link (to {info.linkname!r})"
    if info.ischr() or info.isblk():
        return "is a device file"
    if info.isfifo():
        return "is a FIFO"
    if not info.isreg():
        return f"is not a regular file (type {info.type!r})"
    return None


def check_member(header: bytes, tar: str, name: str, size: int) -> None:
    """Raise UnsafeMember unless `header` (the 512 bytes before the data) is a regular file
    member called `name` holding `size` bytes."""
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise UnsafeMember(
            f"{tar}: no valid tar header before member {name!r} ({e}); the index does not "
            "match the tar"
        ) from None
    why = member_problem(info)
    if why is not None:
        raise UnsafeMember(f"{tar}: member {info.name!r} {why}; refused")
    if info.name != name or info.size != size:
        raise UnsafeMember(
            f"{tar}: the index says member {name!r} of {size} bytes, the tar header there is "
            f"{info.name!r} of {info.size} bytes; the index does not match the tar"
        )
