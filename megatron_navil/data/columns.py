"""The dataset index as columns: fixed-width arrays plus strings as offsets + bytes.

One shape for both sources of an index: the per-shard `*.index.json` files (parsed here, entry by
entry, by `PieceBuilder`) and the binary, memory-mapped index (binindex.py, which stores exactly
these arrays). Per sample i: `kind`, `shard`, `json_offset`, `json_size`, `text_tokens`,
`entry_refused`, `digest`, and its images are rows `image_start[i]:image_start[i + 1]` of the
image columns. Strings (sample keys, image member suffixes, tar names) are a `StringTable`: one
bytes buffer and int64 offsets, decoded only for the rows asked for. No Python object per sample
exists unless a caller asks for one.

Parsing a JSON entry validates it (types, every member inside the tar after a header); an entry
that fails is kept as a row of zeros with `entry_refused = malformed_entry` and a detail string
(a sparse dict), so sample numbering never shifts. Everything else a reader must refuse is
computed from the columns when a sample is planned (costs.py), because a binary index from
elsewhere is as untrusted as a JSON one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_navil.data.members import HEADER_BYTES

KINDS = ("caption", "conversation", "interleaved", "text")
"""Sample kinds, in the order of their int8 codes in the `kind` column."""
REFUSALS = (
    "",
    "malformed_entry",
    "unsafe_key",
    "json_too_large",
    "implausible_tokens",
    "unreadable_json",
    "image_too_large",
    "image_unsizable",
    "duplicate",
)
"""Why a sample is refused, in the order of their int8 codes (0: not refused). Checked in this
order; the first that applies is the sample's reason."""
DIGEST_BYTES = 16
"""blake2b-128 content digest per sample (all zero: none recorded)."""
MAX_INT = 1 << 48
"""Offsets, sizes, counts and pixel sides in an index are below this (larger: malformed)."""

SAMPLE_COLUMNS = {
    "kind": np.int8,
    "shard": np.int32,
    "json_offset": np.int64,
    "json_size": np.int64,
    "text_tokens": np.int64,
    "entry_refused": np.int8,
}
"""Fixed-width per-sample columns and their dtypes (plus image_start [n + 1], digest [n, 16])."""
IMAGE_COLUMNS = {
    "image_offset": np.int64,
    "image_size": np.int64,
    "image_height": np.int64,
    "image_width": np.int64,
}
"""Per-image columns (rows of all samples' images, in sample order)."""
SHARD_COLUMNS = {"shard_tar_bytes": np.int64, "shard_num_samples": np.int64}
"""Per-shard columns (manifest order)."""
STRING_COLUMNS = ("keys", "image_member", "shard_tar")
"""Strings: sample keys, image member suffixes (`jpg`, `0.png`), tar file names."""


class StringTable:
    """Strings i = data[offsets[i]:offsets[i + 1]] (UTF-8); `offsets` has len + 1 entries."""

    MAX_BYTES = 1024
    """A longer entry (only a damaged or hostile index has one) reads as ""."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray):
        self.offsets, self.data = offsets, data

    @classmethod
    def of(cls, strings: list[str]) -> "StringTable":
        raw = [s.encode("utf-8", "surrogatepass") for s in strings]
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in raw], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(raw), dtype=np.uint8).copy())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if not 0 <= a <= b <= len(self.data) or b - a > self.MAX_BYTES:
            return ""
        return bytes(self.data[a:b]).decode("utf-8", "replace")

    def to_list(self) -> list[str]:
        return [self[i] for i in range(len(self))]


@dataclass
class Columns:
    """All columns of one dataset (in memory, or memory-mapped by binindex.open_index)."""

    arrays: dict[str, np.ndarray]
    """SAMPLE_COLUMNS, IMAGE_COLUMNS, SHARD_COLUMNS, `image_start` and `digest`."""
    strings: dict[str, StringTable]
    """STRING_COLUMNS."""
    entry_detail: dict[int, str] = field(default_factory=dict)
    """Sample -> why its entry was refused when converted (only the refused ones)."""

    def __getattr__(self, name: str):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def num_samples(self) -> int:
        return len(self.arrays["kind"])

    @property
    def num_images(self) -> int:
        return len(self.arrays["image_offset"])

    @property
    def num_shards(self) -> int:
        return len(self.arrays["shard_tar_bytes"])


def _int(x, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x < MAX_INT:
        raise ValueError(f"{x!r} is not an integer >= {lo}")
    return x


def _digest(x) -> bytes:
    """16 bytes of a hex digest; zeros when absent or not hex (digests are not trusted)."""
    try:
        raw = bytes.fromhex(x) if isinstance(x, str) else b""
    except ValueError:
        raw = b""
    return raw if len(raw) == DIGEST_BYTES else bytes(DIGEST_BYTES)


class PieceBuilder:
    """Columns of one shard's JSON entries (a *piece*), validated entry by entry."""

    def __init__(self, tar_bytes: int):
        self.tar_bytes = tar_bytes
        self.rows: dict[str, list] = {k: [] for k in (*SAMPLE_COLUMNS, "num_images")}
        self.images: dict[str, list] = {k: [] for k in IMAGE_COLUMNS}
        self.keys: list[str] = []
        self.members: list[str] = []
        self.digests: list[bytes] = []
        self.detail: dict[int, str] = {}

    def add(self, smp) -> None:
        n = len(self.keys)
        key = smp.get("key") if isinstance(smp, dict) else None
        self.keys.append(key if isinstance(key, str) else repr(key)[:80])
        try:
            row, images = self._parse(smp)
            reason = 0
            if not isinstance(key, str):  # a non-string key cannot be checked from its text
                reason, self.detail[n] = REFUSALS.index("unsafe_key"), f"key {key!r}"
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            row, images = dict(kind=0, json_offset=0, json_size=0, text_tokens=-1), []
            reason = REFUSALS.index("malformed_entry")
            self.detail[n] = f"index entry: {type(e).__name__}: {e}"
        for k, v in row.items():
            self.rows[k].append(v)
        self.rows["shard"].append(0)  # the dataset's shard number is set by IndexWriter
        self.rows["entry_refused"].append(reason)
        self.rows["num_images"].append(len(images))
        for member, off, size, h, w in images:
            for k, v in zip(IMAGE_COLUMNS, (off, size, h, w)):
                self.images[k].append(v)
            self.members.append(member)
        self.digests.append(_digest(smp.get("digest")) if isinstance(smp, dict) else _digest(None))

    def _parse(self, smp: dict) -> tuple[dict, list]:
        """Typed row of one index entry; every member must lie inside the tar after a header."""

        def span(member: str) -> tuple[int, int]:
            off, size = smp["members"][member]
            off, size = _int(off, HEADER_BYTES), _int(size)
            if off + size > self.tar_bytes:
                raise ValueError(f"member {member!r} ends past the tar's {self.tar_bytes} bytes")
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
            if not isinstance(member, str):
                raise TypeError(f"image member {member!r} is not a string")
            images.append((member, *span(member), _int(im["height"], 1), _int(im["width"], 1)))
        return row, images

    def finish(self) -> "Piece":
        n_img = np.asarray(self.rows["num_images"], dtype=np.int64)
        arrays = {k: np.asarray(self.rows[k], dtype=t) for k, t in SAMPLE_COLUMNS.items()}
        arrays.update({k: np.asarray(self.images[k], dtype=t) for k, t in IMAGE_COLUMNS.items()})
        arrays["num_images"] = n_img
        arrays["digest"] = np.frombuffer(b"".join(self.digests), dtype=np.uint8).reshape(
            len(self.keys), DIGEST_BYTES
        )
        return Piece(
            arrays, StringTable.of(self.keys), StringTable.of(self.members), dict(self.detail)
        )


@dataclass
class Piece:
    """One shard's columns with shard-relative numbering (`num_images` per sample, string
    offsets from 0); binindex.IndexWriter appends pieces into one dataset index."""

    arrays: dict[str, np.ndarray]
    keys: StringTable
    image_member: StringTable
    detail: dict[int, str]

    def __len__(self) -> int:
        return len(self.arrays["kind"])

    FIELDS = (
        *SAMPLE_COLUMNS,
        *IMAGE_COLUMNS,
        "num_images",
        "digest",
        "key_offsets",
        "key_bytes",
        "member_offsets",
        "member_bytes",
        "detail_rows",
        "detail_offsets",
        "detail_text",
    )
    """What a saved piece holds, in file order."""

    def save(self, path: str) -> None:
        """As .npy records back to back in FIELDS order (navil-preprocess writes one per
        committed shard; the same piece gives the same bytes, so re-runs stay identical)."""
        rows = sorted(self.detail)
        details = StringTable.of([self.detail[i] for i in rows])
        extra = {
            "key_offsets": self.keys.offsets,
            "key_bytes": self.keys.data,
            "member_offsets": self.image_member.offsets,
            "member_bytes": self.image_member.data,
            "detail_rows": np.asarray(rows, dtype=np.int64),
            "detail_offsets": details.offsets,
            "detail_text": details.data,
        }
        with open(path, "wb") as f:
            for name in self.FIELDS:
                np.save(f, {**self.arrays, **extra}[name], allow_pickle=False)

    @classmethod
    def load(cls, path: str) -> Optional["Piece"]:
        """A saved piece, or None when the file is missing or not a complete piece."""
        try:
            with open(path, "rb") as f:
                d = {name: np.load(f, allow_pickle=False) for name in cls.FIELDS}
        except (OSError, ValueError, EOFError):
            return None
        details = StringTable(d["detail_offsets"], d["detail_text"])
        return cls(
            {k: d[k] for k in (*SAMPLE_COLUMNS, *IMAGE_COLUMNS, "num_images", "digest")},
            StringTable(d["key_offsets"], d["key_bytes"]),
            StringTable(d["member_offsets"], d["member_bytes"]),
            {r: details[j] for j, r in enumerate(d["detail_rows"].tolist())},
        )
