"""The binary dataset index: one memory-mapped file per dataset (docs/data_format.md, "Binary
index", version INDEX_VERSION).

    DIR/index/meta.json     format, version, build id, the manifest's sha256, its settings and
                            tokenizer, sizes, and where each column lies in columns.bin
    DIR/index/columns.bin   every column of columns.py back to back (little-endian, each
                            starting at a multiple of 64 bytes)
    DIR/index/duplicate.bin optional, written by navil-dedup: uint8 [num_samples], 1 = a later
                            copy of an earlier sample (dedup.json says which build it marks)

Opening reads meta.json and maps columns.bin once: O(1) files, no per-sample work, and the
pages are the page cache's, shared by every rank of a node (no private copy). One mapping
(one file descriptor) per dataset keeps hundreds of datasets cheap. Columns are read-only views.

Writing (`IndexWriter`) streams shard pieces (columns.Piece) into one temporary file per column,
concatenates them into columns.bin and moves the finished directory into place, so a reader sees
the old index or the new one, never a mixture. The same writer with a `MemorySink` gives the
in-memory Columns of a dataset read from its JSON index, so both paths share one code path.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import uuid
from typing import Optional

import numpy as np

from megatron_navil.data.columns import (
    DIGEST_BYTES,
    IMAGE_COLUMNS,
    SAMPLE_COLUMNS,
    SHARD_COLUMNS,
    STRING_COLUMNS,
    Columns,
    Piece,
    StringTable,
)
from megatron_navil.utils.files import write_json_atomic

INDEX_DIR = "index"
INDEX_FORMAT = "navil-index"
INDEX_VERSION = 1
"""Version of the binary index layout; a reader refuses another one (re-run --reindex)."""
ALIGN = 64
_DTYPES = {
    **SAMPLE_COLUMNS,
    **IMAGE_COLUMNS,
    **SHARD_COLUMNS,
    "image_start": np.int64,
    "digest": np.uint8,
    **{f"{s}.offsets": np.int64 for s in STRING_COLUMNS},
    **{f"{s}.bytes": np.uint8 for s in STRING_COLUMNS},
}
"""Every array in columns.bin and its dtype (stored little-endian)."""


class IndexFormatError(ValueError):
    """columns.bin / meta.json do not describe a whole index of this version."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class MemorySink:
    """Collects appended arrays in memory (the JSON path's Columns)."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in _DTYPES}

    def append(self, name: str, arr: np.ndarray) -> None:
        self.parts[name].append(np.asarray(arr, dtype=_DTYPES[name]))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k, parts in self.parts.items():
            empty = np.zeros((0, DIGEST_BYTES) if k == "digest" else 0, dtype=_DTYPES[k])
            out[k] = np.concatenate(parts) if parts else empty
        return out


class FileSink:
    """Appends each array to its own temporary file under `directory`."""

    def __init__(self, directory: str):
        self.dir = directory
        self.files = {k: open(os.path.join(directory, f"{k}.part"), "wb") for k in _DTYPES}
        self.lengths = dict.fromkeys(_DTYPES, 0)

    def append(self, name: str, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr, dtype=np.dtype(_DTYPES[name]).newbyteorder("<"))
        self.files[name].write(a.tobytes())
        self.lengths[name] += len(a)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class IndexWriter:
    """Appends shard pieces (in manifest order) into one dataset's columns."""

    def __init__(self, sink):
        self.sink = sink
        self.n = self.m = self.num_shards = 0
        self.str_base = dict.fromkeys(STRING_COLUMNS, 0)
        self.detail: dict[int, str] = {}
        self._ident = hashlib.sha256()
        for s in STRING_COLUMNS:
            sink.append(f"{s}.offsets", np.zeros(1, np.int64))
        sink.append("image_start", np.zeros(1, np.int64))

    def _strings(self, name: str, table: StringTable) -> None:
        self.sink.append(f"{name}.offsets", table.offsets[1:] + self.str_base[name])
        self.sink.append(f"{name}.bytes", table.data)
        self.str_base[name] += len(table.data)

    def add_shard(self, tar: str, tar_bytes: int, num_samples: int, piece: Piece) -> None:
        """`num_samples` as the manifest declares it (part of the dataset's identity)."""
        a, k = piece.arrays, len(piece)
        for name in SAMPLE_COLUMNS:
            col = np.full(k, self.num_shards, np.int32) if name == "shard" else a[name]
            self.sink.append(name, col)
        self.sink.append("digest", a["digest"].reshape(k, DIGEST_BYTES))
        self.sink.append("image_start", self.m + np.cumsum(a["num_images"], dtype=np.int64))
        for name in IMAGE_COLUMNS:
            self.sink.append(name, a[name])
        self._strings("keys", piece.keys)
        self._strings("image_member", piece.image_member)
        self._strings("shard_tar", StringTable.of([tar]))
        self.sink.append("shard_tar_bytes", np.asarray([tar_bytes]))
        self.sink.append("shard_num_samples", np.asarray([num_samples]))
        self.detail.update({self.n + i: t for i, t in piece.detail.items()})
        self._ident.update(f"{tar}:{num_samples}:{tar_bytes};".encode())
        self.n += k
        self.m += len(a["image_offset"])
        self.num_shards += 1

    @property
    def fingerprint(self) -> str:
        """Identity of the dataset: sha256 over `tar:num_samples:tar_bytes;` per shard (the
        same whichever index a dataset is read from; a resumed run checks it)."""
        return self._ident.hexdigest()[:16]


def columns_from(arrays: dict[str, np.ndarray], detail: dict[int, str]) -> Columns:
    cols = {k: v for k, v in arrays.items() if "." not in k}
    strings = {s: StringTable(arrays[f"{s}.offsets"], arrays[f"{s}.bytes"]) for s in STRING_COLUMNS}
    return Columns(cols, strings, detail)


def write_index(
    root: str, pieces, manifest_path: str, settings: dict, tokenizer: Optional[dict]
) -> dict:
    """Write `root/index/` from `pieces`: an iterable of (tar, tar_bytes, num_samples, Piece) in
    manifest order. Returns meta.json's content."""
    tmp = os.path.join(root, f"{INDEX_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        sink = FileSink(tmp)
        writer = IndexWriter(sink)
        for tar, tar_bytes, num_samples, piece in pieces:
            writer.add_shard(tar, tar_bytes, num_samples, piece)
        sink.close()
        layout, offset = {}, 0
        with open(os.path.join(tmp, "columns.bin"), "wb") as out:
            for name, dtype in _DTYPES.items():
                offset = -(-offset // ALIGN) * ALIGN
                out.write(b"\0" * (offset - out.tell()))
                part = os.path.join(tmp, f"{name}.part")
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
                os.remove(part)
                count = sink.lengths[name]
                shape = [count, DIGEST_BYTES] if name == "digest" else [count]  # rows
                layout[name] = {
                    "dtype": np.dtype(dtype).newbyteorder("<").str,
                    "offset": offset,
                    "shape": shape,
                }
                offset = out.tell()
            out.flush()
            os.fsync(out.fileno())
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "build_id": uuid.uuid4().hex[:16],
            "manifest_sha256": file_sha256(manifest_path),
            "num_samples": writer.n,
            "num_images": writer.m,
            "num_shards": writer.num_shards,
            "fingerprint": writer.fingerprint,
            "settings": settings,
            "tokenizer": tokenizer,
            "entry_detail": {str(i): t for i, t in sorted(writer.detail.items())},
            "columns": layout,
        }
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        _swap_into_place(tmp, os.path.join(root, INDEX_DIR))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _swap_into_place(tmp: str, final: str) -> None:
    """Replace `final` by `tmp` (both directories): readers see one or the other."""
    for _ in range(5):
        old = None
        if os.path.exists(final):
            old = f"{final}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, old)
            except FileNotFoundError:  # another writer moved it first
                old = None
        try:
            os.rename(tmp, final)
        except OSError:  # another writer put its (equivalent) index in between: try again
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not move {tmp} to {final}")


def read_meta(root: str) -> Optional[dict]:
    """meta.json of `root/index`, or None when there is no binary index."""
    path = os.path.join(root, INDEX_DIR, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: not a {INDEX_FORMAT} meta file")
    if meta.get("version") != INDEX_VERSION:
        raise IndexFormatError(
            f"{path}: index version {meta.get('version')!r}, this reader reads {INDEX_VERSION}"
        )
    return meta


def open_columns(root: str, meta: dict) -> Columns:
    """Map `root/index/columns.bin` read-only and view every column in it (checked against
    meta.json: dtype, shape, bounds, and the sizes the shapes must agree on)."""
    path = os.path.join(root, INDEX_DIR, "columns.bin")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if size and hasattr(mmap, "MADV_RANDOM"):
            # planner windows read runs of rows: no kernel readahead of megabytes around each
            buf.madvise(mmap.MADV_RANDOM)
    except OSError as e:
        raise IndexFormatError(f"{path}: {e}") from None
    layout = meta.get("columns")
    if not isinstance(layout, dict) or set(layout) != set(_DTYPES):
        raise IndexFormatError(f"{path}: meta.json does not list this version's columns")
    arrays = {}
    for name, dtype in _DTYPES.items():
        spec = layout[name]
        want = np.dtype(dtype).newbyteorder("<")
        try:
            shape = tuple(int(x) for x in spec["shape"])
            offset = int(spec["offset"])
            ok = np.dtype(spec["dtype"]) == want and all(x >= 0 for x in shape) and offset >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        count = int(np.prod(shape)) if ok else 0
        if not ok or offset + count * want.itemsize > size:
            raise IndexFormatError(f"{path}: column {name} lies outside the file or is mistyped")
        arr = np.frombuffer(buf, dtype=want, count=count, offset=offset) if count else None
        arrays[name] = (arr if arr is not None else np.zeros(count, want)).reshape(shape)
    _check_sizes(path, arrays, meta)
    detail = meta.get("entry_detail") or {}
    return columns_from(arrays, {int(k): str(v) for k, v in detail.items()})


def _check_sizes(path: str, a: dict[str, np.ndarray], meta: dict) -> None:
    n, m, s = meta.get("num_samples"), meta.get("num_images"), meta.get("num_shards")
    sizes = {
        **{k: n for k in SAMPLE_COLUMNS},
        **{k: m for k in IMAGE_COLUMNS},
        **{k: s for k in SHARD_COLUMNS},
        "image_start": None if n is None else n + 1,
        "digest": n,
        "keys.offsets": None if n is None else n + 1,
        "image_member.offsets": None if m is None else m + 1,
        "shard_tar.offsets": None if s is None else s + 1,
    }
    for k, want in sizes.items():
        if len(a[k]) != want:
            raise IndexFormatError(f"{path}: column {k} has {len(a[k])} rows, meta says {want}")
