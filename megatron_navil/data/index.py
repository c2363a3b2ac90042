"""Dataset index: what navil-preprocess wrote (docs/data_format.md), as compact numpy arrays.

A dataset directory holds `manifest.json` (written last: its presence means the dataset is
complete) and, per shard, a tar plus `*.index.json` with every member's byte offset, the image
sizes after EXIF orientation and the text token count. Everything a pack planner needs is read
here once, without opening a tar; samples are then read by offset (`ShardReader`).

Token counts: `text_tokens` are trusted only when the manifest's tokenizer hash equals ours
and (for conversations) the manifest's chat template equals our chat style; otherwise they are
recounted from each sample's JSON with `count_sample_tokens` (logged: slow on big data).

Untrusted shards (docs/data_format.md, "Reading untrusted shards"): file names must be plain
names inside the dataset directory (else the dataset is refused); a sample whose index entry
is malformed, whose key is unsafe, whose JSON member is over the dataset's limit or whose token
count is implausible for its JSON's size (limits.py), or (`refuse_images`) whose image is over
the pixel limit, or (sizing.py) that NaViL's resize rule cannot size, is *refused*:
`refused[i]` holds the reason's code, the planner skips it and the builder logs its key once.
Every member is read with its tar header checked (members.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION, count_sample_tokens
from megatron_navil.data.limits import (
    TOKEN_SLACK,
    implausible_tokens,
    max_image_bytes,
    max_json_bytes,
)
from megatron_navil.data.members import (
    HEADER_BYTES,
    UnsafeMember,
    check_member,
    safe_file_name,
    safe_key,
)
from megatron_navil.errors import UserError
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

KINDS = ("caption", "conversation", "interleaved", "text")
"""Sample kinds, in the order of their int8 codes in `DatasetIndex.kind`."""
REFUSALS = (
    "",
    "malformed_entry",
    "unsafe_key",
    "json_too_large",
    "implausible_tokens",
    "unreadable_json",
    "image_too_large",
    "image_unsizable",
)
"""Why a sample is refused, in the order of the int8 codes of `DatasetIndex.refused` (0: not)."""


class DataError(UserError, ValueError):
    """A dataset the loader cannot use; the message names the path and what to do."""


@dataclass
class DatasetIndex:
    """All samples of one dataset directory; arrays are indexed by sample (or image) number."""

    root: str
    tars: list[str]
    """Absolute tar path per shard."""
    keys: list[str]
    kind: np.ndarray
    """int8 [n]: index into KINDS."""
    shard: np.ndarray
    """int32 [n]: shard of each sample (index into `tars`)."""
    json_offset: np.ndarray
    """int64 [n]: byte offset of the sample's JSON member in its tar."""
    json_size: np.ndarray
    text_tokens: np.ndarray
    """int64 [n]: text token ids of the sample, images excluded (see data_format.md)."""
    image_start: np.ndarray
    """int64 [n + 1]: images of sample i are image rows image_start[i]:image_start[i+1]."""
    image_offset: np.ndarray
    image_size: np.ndarray
    image_height: np.ndarray
    image_width: np.ndarray
    image_member: list[str]
    fingerprint: str
    """Identity of the dataset (shard names, sizes, sample counts): a resumed run checks it."""
    refused: np.ndarray
    """int8 [n]: index into REFUSALS; samples with a non-zero code are never read."""
    refusal_detail: dict[int, str]
    """Sample -> what is wrong with it, for the refused ones (logged with the key)."""

    def __len__(self) -> int:
        return len(self.keys)

    def refuse(self, i: int, reason: str, detail: str) -> None:
        if not self.refused[i]:
            self.refused[i] = REFUSALS.index(reason)
            self.refusal_detail[i] = detail

    def refuse_images(self, max_pixels: int) -> int:
        """Refuse samples with an image whose indexed size is over `max_pixels`, or whose
        member has more bytes than such an image can (limits.max_image_bytes); returns how
        many were refused. (The decoder checks the header itself too: the index may lie.)"""
        pixels = self.image_height.astype(np.int64) * self.image_width.astype(np.int64)
        bad = (pixels > max_pixels) | (self.image_size > max_image_bytes(max_pixels))
        owner = np.repeat(np.arange(len(self)), np.diff(self.image_start))
        n = 0
        for r in np.nonzero(bad)[0]:
            i = int(owner[r])
            if not self.refused[i]:
                n += 1
            self.refuse(
                i,
                "image_too_large",
                f"image {self.image_member[r]} is {int(self.image_width[r])}x"
                f"{int(self.image_height[r])} px, {int(self.image_size[r])} bytes; the limit is "
                f"{max_pixels} px",
            )
        return n


def load_dataset(root: str, tokenizer, chat_style: str, recount: bool = True) -> DatasetIndex:
    """Read `root/manifest.json` and every shard index listed in it (in manifest order)."""
    root = os.path.abspath(root)
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(
            f"{root}: no manifest.json. Not a finished navil-preprocess output "
            "(the manifest is written when the last partition completes); point "
            "data paths at the preprocess --output directory"
        )
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format_version {got!r}, this loader reads version 1")
    tok_meta = manifest.get("tokenizer") or {}
    same_tok = tok_meta.get("model_sha256") is not None and tok_meta.get("model_sha256") == getattr(
        tokenizer, "sha256", None
    )
    settings = manifest.get("settings") or {}
    same_style = (
        settings.get("chat_template") == chat_style
        and settings.get("chat_encoding", 1) == CHAT_ENCODING_VERSION
    )
    rows = _Rows(max_json_bytes(settings))
    tars = []
    ident = hashlib.sha256()
    for entry in _shard_entries(manifest, path):
        tars.append(os.path.join(root, entry["tar"]))
        ident.update(f"{entry['tar']}:{entry['num_samples']}:{entry['tar_bytes']};".encode())
        index_path = os.path.join(root, entry["index"])
        shard_index = _read_json(index_path)
        samples = shard_index.get("samples") if isinstance(shard_index, dict) else None
        if not isinstance(samples, list):
            raise DataError(f"{index_path}: no list of samples; re-run navil-preprocess")
        for smp in samples:
            rows.add(smp, len(tars) - 1, entry["tar_bytes"])
    ds = rows.dataset(root, tars, ident.hexdigest()[:16])
    if len(ds) == 0:
        raise DataError(f"{root}: the dataset has no samples")
    stale = np.zeros(len(ds), dtype=bool) if same_tok else np.ones(len(ds), dtype=bool)
    if not same_style:  # only conversations depend on the chat template
        stale |= ds.kind == KINDS.index("conversation")
    stale &= ds.refused == 0
    if stale.any():
        theirs = settings.get("chat_template")
        why = (
            "its index was made with another tokenizer (manifest tokenizer hash differs or "
            "is missing)"
            if not same_tok
            else f"its conversations were counted with chat template {theirs!r}, not {chat_style!r}"
            if theirs != chat_style
            else f"its conversations were counted with chat encoding version "
            f"{settings.get('chat_encoding', 1)}, this loader uses {CHAT_ENCODING_VERSION} "
            "(whole-string tokenization)"
        )
        if not recount:
            raise DataError(
                f"{root}: {why}; re-run navil-preprocess with this tokenizer/"
                "template or set data.recount_tokens: true"
            )
        log.warning(
            "%s: %s; recounting %d samples' text tokens from their JSON",
            root,
            why,
            int(stale.sum()),
        )
        _recount(ds, np.nonzero(stale)[0], tokenizer, chat_style)
    for i in np.nonzero(ds.refused == 0)[0]:
        t, size = int(ds.text_tokens[i]), int(ds.json_size[i])
        if t < 0 or implausible_tokens(t, size):
            ds.refuse(
                int(i),
                "implausible_tokens",
                f"the index gives {t} text tokens for a JSON member of {size} bytes "
                f"(at most {size} + {TOKEN_SLACK} are possible)",
            )
    return ds


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run navil-preprocess") from None


def _shard_entries(manifest: dict, path: str) -> list[dict]:
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


def _int(x, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x < 1 << 48:
        raise ValueError(f"{x!r} is not an integer >= {lo}")
    return x


class _Rows:
    """Column builder of DatasetIndex: validates each index entry as it is added."""

    COLUMNS = (
        "kind",
        "shard",
        "json_offset",
        "json_size",
        "text_tokens",
        "num_images",
        "image_offset",
        "image_size",
        "image_height",
        "image_width",
    )

    def __init__(self, json_limit: int):
        self.json_limit = json_limit
        self.cols: dict[str, list] = {k: [] for k in self.COLUMNS}
        self.keys: list[str] = []
        self.members: list[str] = []
        self.refused: list[int] = []
        self.detail: dict[int, str] = {}

    def add(self, smp, shard: int, tar_bytes: int) -> None:
        n = len(self.keys)
        key = smp.get("key") if isinstance(smp, dict) else None
        self.keys.append(key if isinstance(key, str) else repr(key)[:80])
        try:
            row, images = self._parse(smp, tar_bytes)
            reason, detail = "", ""
            if not safe_key(key):
                reason, detail = "unsafe_key", f"key {key!r} is not [A-Za-z0-9_-]"
            elif row["json_size"] > self.json_limit:
                reason = "json_too_large"
                detail = f"JSON member of {row['json_size']} bytes > limit {self.json_limit}"
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            row, images = dict(kind=0, json_offset=0, json_size=0, text_tokens=-1), []
            reason, detail = "malformed_entry", f"index entry: {type(e).__name__}: {e}"
        for k, v in row.items():
            self.cols[k].append(v)
        self.cols["shard"].append(shard)
        self.cols["num_images"].append(len(images))
        for member, off, size, h, w in images:
            self.cols["image_offset"].append(off)
            self.cols["image_size"].append(size)
            self.cols["image_height"].append(h)
            self.cols["image_width"].append(w)
            self.members.append(member)
        self.refused.append(REFUSALS.index(reason))
        if reason:
            self.detail[n] = detail

    @staticmethod
    def _parse(smp: dict, tar_bytes: int) -> tuple[dict, list]:
        """Typed row of one index entry; every member must lie inside the tar after a header."""

        def span(member: str) -> tuple[int, int]:
            off, size = smp["members"][member]
            off, size = _int(off, HEADER_BYTES), _int(size)
            if off + size > tar_bytes:
                raise ValueError(f"member {member!r} ends past the tar's {tar_bytes} bytes")
            return off, size

        off, size = span("json")
        t = smp.get("text_tokens")
        row = dict(
            kind=KINDS.index(smp["kind"]),
            json_offset=off,
            json_size=size,
            text_tokens=-1 if t is None else _int(t),
        )
        images = []
        for im in smp["images"]:
            member = im["member"]
            images.append((member, *span(member), _int(im["height"], 1), _int(im["width"], 1)))
        return row, images

    def dataset(self, root: str, tars: list[str], fingerprint: str) -> DatasetIndex:
        c = self.cols
        n_img = np.asarray(c["num_images"], dtype=np.int64)
        return DatasetIndex(
            root=root,
            tars=tars,
            keys=self.keys,
            kind=np.asarray(c["kind"], dtype=np.int8),
            shard=np.asarray(c["shard"], dtype=np.int32),
            json_offset=np.asarray(c["json_offset"], dtype=np.int64),
            json_size=np.asarray(c["json_size"], dtype=np.int64),
            text_tokens=np.asarray(c["text_tokens"], dtype=np.int64),
            image_start=np.concatenate([[0], np.cumsum(n_img)]).astype(np.int64),
            image_offset=np.asarray(c["image_offset"], dtype=np.int64),
            image_size=np.asarray(c["image_size"], dtype=np.int64),
            image_height=np.asarray(c["image_height"], dtype=np.int64),
            image_width=np.asarray(c["image_width"], dtype=np.int64),
            image_member=self.members,
            fingerprint=fingerprint,
            refused=np.asarray(self.refused, dtype=np.int8),
            refusal_detail=self.detail,
        )


def _recount(ds: DatasetIndex, rows: np.ndarray, tokenizer, chat_style: str) -> None:
    with ShardReader(ds.tars) as reader:
        for i in rows:
            key = ds.keys[i]
            try:
                doc = json.loads(
                    reader.read_member(
                        int(ds.shard[i]),
                        int(ds.json_offset[i]),
                        int(ds.json_size[i]),
                        key + ".json",
                    )
                )
                ds.text_tokens[i] = count_sample_tokens(tokenizer, doc, chat_style)
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnsafeMember too
                ds.refuse(int(i), "unreadable_json", f"recounting its tokens: {e}")


class ShardReader:
    """Reads members of shard tars with os.pread through a small cache of open files."""

    def __init__(self, tars: list[str], max_open: int = 64):
        self.tars, self.max_open = tars, max_open
        self._fds: "OrderedDict[int, int]" = OrderedDict()

    def read_member(self, shard: int, offset: int, size: int, name: str) -> bytes:
        """The `size` bytes at `offset`, after checking the tar header right before them
        describes a regular file `name` of that size (members.check_member; UnsafeMember)."""
        if offset < HEADER_BYTES:
            raise UnsafeMember(f"{self.tars[shard]}: member {name!r} has no header before it")
        data = self.read(shard, offset - HEADER_BYTES, size + HEADER_BYTES)
        check_member(data[:HEADER_BYTES], self.tars[shard], name, size)
        return data[HEADER_BYTES:]

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.tars[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(
                f"{self.tars[shard]}: short read at {offset} ({len(data)} of {size} "
                "bytes); the shard is truncated"
            )
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

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
