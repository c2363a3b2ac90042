"""Dataset index: what navil-preprocess wrote (docs/data_format.md), as columns of numpy arrays.

A dataset directory holds `manifest.json` (written last: its presence means the dataset is
complete), per shard a tar plus `*.index.json`, and the binary index `index/` (binindex.py):
every column memory-mapped from one file, opened in O(1) per dataset with no per-sample work
and shared by all ranks of a node. An output without `index/` (made before it existed) is read
from its JSON indexes into the same columns (slow for big data: logged, with the command that
converts it: `navil-preprocess --reindex DIR`). A binary index built for another manifest.json
is refused in one line (re-run --reindex); so is a manifest whose shard tars are missing or
have other sizes than it records.

Token counts: `text_tokens` are trusted only when the index's tokenizer hash equals ours and
(for conversations) its chat template equals our chat style; otherwise costs.py recounts them
from each sample's JSON as its window is planned (logged: slow on big data).

Untrusted shards (docs/data_format.md, "Reading untrusted shards"): file names must be plain
names inside the dataset directory (else the dataset is refused); every per-sample refusal
(columns.REFUSALS) is computed from the columns when the sample is planned (costs.py), so a
hostile binary index is checked as closely as a hostile JSON one. Every member is read with its
tar header checked (members.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_navil.data.binindex import (
    INDEX_DIR,
    IndexFormatError,
    IndexWriter,
    MemorySink,
    columns_from,
    file_sha256,
    open_columns,
    read_meta,
)
from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION
from megatron_navil.data.columns import KINDS, REFUSALS, Columns, PieceBuilder
from megatron_navil.data.limits import max_json_bytes
from megatron_navil.data.members import HEADER_BYTES, UnsafeMember, check_member, safe_file_name
from megatron_navil.errors import UserError
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["KINDS", "REFUSALS", "DataError", "DatasetIndex", "load_dataset", "ShardReader"]


class DataError(UserError, ValueError):
    """A dataset the loader cannot use; the message names the path and what to do."""


class TarPaths:
    """Absolute tar path per shard, decoded from the index's string table when asked for."""

    def __init__(self, root: str, cols: Columns):
        self.root, self.names = root, cols.strings["shard_tar"]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, s: int) -> str:
        return os.path.join(self.root, self.names[s])


@dataclass
class DatasetIndex:
    """One dataset directory: its columns (columns.py; memory-mapped or in memory) plus what
    the loader needs to judge them (its settings, whether its token counts are ours)."""

    root: str
    cols: Columns
    fingerprint: str
    """Identity of the dataset (shard names, sizes, sample counts): a resumed run checks it."""
    json_limit: int
    """The JSON member limit the dataset was made with (limits.max_json_bytes)."""
    source: str
    """"binary" (index/) or "json" (the per-shard index.json files)."""
    settings: dict
    """The manifest's settings (navil-preprocess flags)."""
    tokenizer_meta: dict
    """The manifest's tokenizer entry ({} without one)."""
    recount_all: bool = False
    """Every text_tokens must be recounted (the index was counted with another tokenizer)."""
    recount_conversations: bool = False
    """Conversations' text_tokens must be recounted (another chat template or encoding)."""
    duplicate: Optional[np.ndarray] = None
    """uint8 [n] marks of navil-dedup (1: a later copy of an earlier sample), or None."""

    def __post_init__(self):
        self.tars = TarPaths(self.root, self.cols)

    def __len__(self) -> int:
        return self.cols.num_samples

    def __getattr__(self, name: str):
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols.arrays:  # the columns: ds.kind, ds.image_start, ...
            return cols.arrays[name]
        raise AttributeError(name)

    @property
    def num_images(self) -> int:
        return self.cols.num_images

    def key(self, i: int) -> str:
        return self.cols.strings["keys"][i]

    def image_member(self, r: int) -> str:
        return self.cols.strings["image_member"][r]


def load_dataset(root: str, tokenizer, chat_style: str, recount: bool = True) -> DatasetIndex:
    """Open `root`: its binary index when present, else its JSON indexes (manifest order)."""
    root = os.path.abspath(root)
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(
            f"{root}: no manifest.json. Not a finished navil-preprocess output "
            "(the manifest is written when the last partition completes); point "
            "data paths at the preprocess --output directory"
        )
    try:
        meta = read_meta(root)
    except IndexFormatError as e:
        raise DataError(f"{e}; run navil-preprocess --reindex {root}") from None
    if meta is not None:
        ds = _open_binary(root, path, meta)
    else:
        ds = _read_json_index(root, path)
    if len(ds) == 0:
        raise DataError(f"{root}: the dataset has no samples")
    _check_shards(path, ds)
    _judge_tokens(ds, tokenizer, chat_style, recount)
    return ds


def _open_binary(root: str, manifest_path: str, meta: dict) -> DatasetIndex:
    if meta.get("manifest_sha256") != file_sha256(manifest_path):
        raise DataError(
            f"{os.path.join(root, INDEX_DIR)} was built for another manifest.json (the dataset "
            f"changed after it was indexed); run navil-preprocess --reindex {root}"
        )
    try:
        cols = open_columns(root, meta)
    except IndexFormatError as e:
        raise DataError(f"{e}; run navil-preprocess --reindex {root}") from None
    bad = _unsafe_name(cols.strings["shard_tar"])
    if bad is not None:
        raise DataError(
            f"{os.path.join(root, INDEX_DIR)}: names shard {bad!r}, not a plain file name "
            "inside the dataset directory; refused: this index was not written by navil-preprocess"
        )
    settings = meta.get("settings") or {}
    fingerprint = meta.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 16:
        raise DataError(f"{os.path.join(root, INDEX_DIR)}: no fingerprint; run --reindex {root}")
    return DatasetIndex(
        root,
        cols,
        fingerprint,
        max_json_bytes(settings),
        "binary",
        settings,
        meta.get("tokenizer") or {},
        duplicate=_duplicates(root, meta, len(cols.arrays["kind"])),
    )


def _read_json_index(root: str, manifest_path: str) -> DatasetIndex:
    """The columns of a dataset from its per-shard index.json files (no binary index)."""
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{manifest_path}: format_version {got!r}, this loader reads version 1")
    settings = manifest.get("settings") or {}
    sink = MemorySink()
    writer = IndexWriter(sink)
    for tar, tar_bytes, num_samples, piece in json_pieces(root, manifest, manifest_path):
        writer.add_shard(tar, tar_bytes, num_samples, piece)
    cols = columns_from(sink.arrays(), writer.detail)
    fingerprint = writer.fingerprint
    if len(cols.arrays["kind"]) >= JSON_SLOW_SAMPLES:
        log.warning(
            "%s: read %d samples from the JSON index (no binary index/): every rank parses "
            "it; run navil-preprocess --reindex %s once to open it in O(1)",
            root,
            len(cols.arrays["kind"]),
            root,
        )
    return DatasetIndex(
        root,
        cols,
        fingerprint,
        max_json_bytes(settings),
        "json",
        settings,
        manifest.get("tokenizer") or {},
    )


JSON_SLOW_SAMPLES = 100_000
"""A JSON-indexed dataset at least this big gets a warning suggesting --reindex."""


def json_pieces(root: str, manifest: dict, manifest_path: str):
    """(tar, tar_bytes, num_samples, Piece) per manifest shard, parsed from its index.json."""
    for entry in shard_entries(manifest, manifest_path):
        index_path = os.path.join(root, entry["index"])
        shard_index = _read_json(index_path)
        samples = shard_index.get("samples") if isinstance(shard_index, dict) else None
        if not isinstance(samples, list):
            raise DataError(f"{index_path}: no list of samples; re-run navil-preprocess")
        builder = PieceBuilder(entry["tar_bytes"])
        for smp in samples:
            builder.add(smp)
        yield entry["tar"], entry["tar_bytes"], entry["num_samples"], builder.finish()


_NAME_BYTES = np.zeros(256, dtype=bool)
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-":
    _NAME_BYTES[_c] = True


def _unsafe_name(names) -> Optional[str]:
    """The first name of a StringTable that members.safe_file_name refuses (vectorised over the
    bytes: O(shards) without a Python string per shard), or None."""
    off, data = np.asarray(names.offsets), np.asarray(names.data)
    lengths = np.diff(off)
    ok_table = len(off) >= 1 and off[0] == 0 and off[-1] == len(data) and (lengths >= 0).all()
    if not ok_table:
        return "<damaged name table>"
    bad = (lengths < 1) | (lengths > 255)
    starts = np.minimum(off[:-1], max(len(data) - 1, 0))
    if len(data):
        bad |= data[starts] == ord(".")  # hidden files, and the start of any ".."
        bad_byte = ~_NAME_BYTES[data]
        dots = np.zeros(len(data), bool)
        dots[1:] = (data[1:] == ord(".")) & (data[:-1] == ord("."))
        owner = np.searchsorted(off, np.nonzero(bad_byte | dots)[0], side="right") - 1
        bad[owner[(owner >= 0) & (owner < len(bad))]] = True
    first = np.nonzero(bad)[0]
    return names[int(first[0])] if len(first) else None


def _check_shards(manifest_path: str, ds: DatasetIndex) -> None:
    """Every shard tar exists with the size the manifest recorded (one stat per distinct tar)."""
    names = ds.cols.strings["shard_tar"]
    raw, off = bytes(np.asarray(names.data)), np.asarray(names.offsets).tolist()
    root = os.fsencode(ds.root)
    seen: dict[bytes, int] = {}
    for s, want in enumerate(ds.cols.arrays["shard_tar_bytes"].tolist()):
        name = raw[off[s] : off[s + 1]]
        got = seen.get(name)
        if got == want:
            continue
        tar = ds.tars[s]
        try:
            got = seen[name] = os.stat(os.path.join(root, name)).st_size
        except OSError as e:
            raise DataError(
                f"{manifest_path}: shard {tar} is missing ({e.strerror}); the dataset changed "
                "after navil-preprocess wrote it: restore the file or re-run navil-preprocess"
            ) from None
        if got != want:
            raise DataError(
                f"{manifest_path}: shard {tar} has {got} bytes, the manifest records {want}; "
                "the dataset changed after navil-preprocess wrote it: restore the file or "
                "re-run navil-preprocess"
            )


def _duplicates(root: str, meta: dict, n: int) -> Optional[np.ndarray]:
    """navil-dedup's marks when they belong to this build of the index (else None)."""
    path = os.path.join(root, INDEX_DIR, "dedup.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("build_id") != meta.get("build_id"):
        log.warning("%s: duplicate marks of another index build ignored; re-run navil-dedup", root)
        return None
    marks = np.memmap(os.path.join(root, INDEX_DIR, "duplicate.bin"), np.uint8, "r")
    if len(marks) != n:
        raise DataError(f"{path}: duplicate marks for {len(marks)} samples, the index has {n}")
    return marks


def _judge_tokens(ds: DatasetIndex, tokenizer, chat_style: str, recount: bool) -> None:
    """Decide which token counts are ours; refuse (recount off) or log (on) the others."""
    settings, tok_meta = ds.settings, ds.tokenizer_meta
    same_tok = tok_meta.get("model_sha256") is not None and tok_meta.get("model_sha256") == getattr(
        tokenizer, "sha256", None
    )
    same_style = (
        settings.get("chat_template") == chat_style
        and settings.get("chat_encoding", 1) == CHAT_ENCODING_VERSION
    )
    ds.recount_all = not same_tok
    ds.recount_conversations = not same_style
    if same_tok and same_style:
        return
    if not same_tok:
        stale = len(ds)
    else:  # only conversations depend on the chat template
        stale = int(np.count_nonzero(np.asarray(ds.kind) == KINDS.index("conversation")))
    if not stale:
        return
    theirs = settings.get("chat_template")
    why = (
        "its index was made with another tokenizer (manifest tokenizer hash differs or is missing)"
        if not same_tok
        else f"its conversations were counted with chat template {theirs!r}, not {chat_style!r}"
        if theirs != chat_style
        else f"its conversations were counted with chat encoding version "
        f"{settings.get('chat_encoding', 1)}, this loader uses {CHAT_ENCODING_VERSION} "
        "(whole-string tokenization)"
    )
    if not recount:
        raise DataError(
            f"{ds.root}: {why}; re-run navil-preprocess with this tokenizer/"
            "template or set data.recount_tokens: true"
        )
    log.warning(
        "%s: %s; recounting %d samples' text tokens from their JSON as their windows are "
        "planned (every epoch, on every rank: re-run navil-preprocess with this tokenizer to "
        "avoid it)",
        ds.root,
        why,
        stale,
    )


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run navil-preprocess") from None


def shard_entries(manifest: dict, path: str) -> list[dict]:
    """The manifest's shard list, each file name checked to be a plain name in the directory."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: no list of shards; re-run navil-preprocess")
    for entry in shards:
        names = [entry.get(k) for k in ("tar", "index")] if isinstance(entry, dict) else [None]
        bad = next((n for n in names if not safe_file_name(n)), 0)
        if bad != 0 or not all(isinstance(entry.get(k), int) for k in ("num_samples", "tar_bytes")):
            raise DataError(
                f"{path}: shard entry {str(entry)[:200]} names {bad!r}, not a plain file "
                "name inside the dataset directory (or lacks its sizes); refused: this manifest "
                "was not written by navil-preprocess"
            )
    return shards


class FdCache:
    """Open file descriptors by key, least recently used closed first (shared by the readers of
    many datasets, so hundreds of datasets never hold more than `max_open` files)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds: "OrderedDict[object, int]" = OrderedDict()

    def get(self, key, path: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[key] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class ShardReader:
    """Reads members of shard tars with os.pread through a cache of open files."""

    def __init__(self, tars, cache: Optional[FdCache] = None):
        self.tars = tars
        self._own = cache is None
        self._cache = FdCache() if cache is None else cache

    def read_member(self, shard: int, offset: int, size: int, name: str) -> bytes:
        """The `size` bytes at `offset`, after checking the tar header right before them
        describes a regular file `name` of that size (members.check_member; UnsafeMember)."""
        if offset < HEADER_BYTES:
            raise UnsafeMember(f"{self.tars[shard]}: member {name!r} has no header before it")
        data = self.read(shard, offset - HEADER_BYTES, size + HEADER_BYTES)
        check_member(data[:HEADER_BYTES], self.tars[shard], name, size)
        return data[HEADER_BYTES:]

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._cache.get((id(self), shard), self.tars[shard])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(
                f"{self.tars[shard]}: short read at {offset} ({len(data)} of {size} "
                "bytes); the shard is truncated"
            )
        return data

    def close(self) -> None:
        if self._own:
            self._cache.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def blended_fingerprint(datasets: list[DatasetIndex], extra: Optional[dict] = None) -> str:
    """Identity of a list of datasets plus the settings that shape the plan."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(ds.fingerprint.encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]
