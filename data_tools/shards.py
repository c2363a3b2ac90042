"""Shard writing: WebDataset tar + DALI index + per-shard JSON index, committed atomically.

A *segment* is a contiguous run of one partition's input records; it ends when its shard is full
(or the input ends). Its files are written under temporary names and renamed in this order:
`.tar`, `.idx` (DALI), `.cols.npy` (its columns for the binary index, data_tools/reindex.py),
and LAST `.index.json`, which is the commit marker: a segment is finished
iff its `.index.json` exists. A killed job can leave `*.tmp*` files or a tar without its
`.index.json`; the next run deletes and redoes those. Tar headers use fixed metadata (mtime 0,
uid 0) so re-running over the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_navil.data.columns import PieceBuilder
from megatron_navil.utils.files import write_json_atomic, write_text_atomic

DALI_INDEX_VERSION = "v1.2"
"""Header of DALI's webdataset index format (what its `wds2idx` writes)."""
_BLOCK = 512


def shard_stem(partition: int, segment: int) -> str:
    """`shard-p{partition:05d}-{segment:06d}`: unique across partitions; no dots (WebDataset
    splits member names at the first dot)."""
    return f"shard-p{partition:05d}-{segment:06d}"


def sample_key(stem: str, i: int) -> str:
    return f"{stem[len('shard-') :]}-{i:06d}"


def spool_dir(out_dir: str, partition: int) -> str:
    """Where a partition's workers spool image bytes until a writer puts them in a tar."""
    return os.path.join(out_dir, f".spool-p{partition:05d}")


@dataclass(frozen=True)
class SpoolRef:
    """Bytes a worker spooled: `size` bytes at `offset` of the file `path`."""

    path: str
    offset: int
    size: int

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.path}: spool file cut short at {self.offset}")
        return data


Payload = Union[bytes, SpoolRef]
"""A member's bytes, or where a worker spooled them."""


@dataclass
class Member:
    """One tar member of a sample."""

    name: str
    """Full member name, `{key}.{ext}`."""
    offset: int
    """Byte offset of the member's DATA (after its 512-byte header) inside the tar."""
    size: int
    """Data size in bytes."""


class ShardWriter:
    """Appends samples to `{stem}.tar.tmp` and records where every member's bytes are."""

    def __init__(self, out_dir: str, stem: str):
        self.out_dir, self.stem = out_dir, stem
        self.tmp_path = os.path.join(out_dir, f"{stem}.tar.tmp")
        self._f = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[list[Member]] = []

    @property
    def nbytes(self) -> int:
        return self._f.tell()

    @staticmethod
    def sample_bytes(members: list[tuple[str, Payload]]) -> int:
        """Tar bytes a sample adds (header + data padded to 512 per member)."""
        return sum(_BLOCK + -(-len(d) // _BLOCK) * _BLOCK for _, d in members)

    def add(self, members: list[tuple[str, Payload]]) -> list[Member]:
        out = []
        for name, data in members:
            if isinstance(data, SpoolRef):
                data = data.read()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            # Data ends on a 512 boundary: its start is the end minus the padded size.
            end = self._f.tell()
            out.append(Member(name, end - -(-len(data) // _BLOCK) * _BLOCK, len(data)))
        self.samples.append(out)
        return out

    def finish(self) -> tuple[str, str, int]:
        """Close the tar, rename it into place, write the DALI index. Returns (tar, idx, bytes)."""
        self._tar.close()  # writes the two zero end-of-archive blocks
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        tar_name, idx_name = f"{self.stem}.tar", f"{self.stem}.idx"
        size = os.path.getsize(self.tmp_path)
        os.replace(self.tmp_path, os.path.join(self.out_dir, tar_name))
        write_text_atomic(os.path.join(self.out_dir, idx_name), dali_index_text(self.samples))
        return tar_name, idx_name, size

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def dali_index_text(samples: list[list[Member]]) -> str:
    """DALI webdataset index v1.2: `v1.2 <num samples>`, then one line per sample with
    `<ext> <data offset> <size> <member name>` for each member (same as `wds2idx`)."""
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(
            " ".join(f"{m.name.split('.', 1)[1]} {m.offset} {m.size} {m.name}" for m in members)
        )
    return "\n".join(lines) + "\n"


@dataclass
class Segment:
    """The `.index.json` of one segment (docs/data_format.md, "Shard index")."""

    partition: int
    segment: int
    fingerprint: str
    records_start: int
    """Ordinal of the first input record of this segment in its partition's enumeration."""
    records_end: int
    """Ordinal after its last record (resume skips this many records)."""
    tar: Optional[str] = None
    idx: Optional[str] = None
    tar_bytes: int = 0
    read: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejected_samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return shard_stem(self.partition, self.segment)

    def to_json(self, format_version: int) -> dict[str, Any]:
        return {
            "format_version": format_version,
            "shard": self.stem,
            "tar": self.tar,
            "dali_index": self.idx,
            "tar_bytes": self.tar_bytes,
            "partition": self.partition,
            "segment": self.segment,
            "settings_fingerprint": self.fingerprint,
            "records": [self.records_start, self.records_end],
            "counts": {"read": self.read, "written": len(self.samples), "rejected": self.rejected},
            "samples": self.samples,
            "rejected": self.rejected_samples,
        }

    def commit(self, out_dir: str, format_version: int) -> None:
        """Write the shard's columns piece (for the binary index), then its index.json: the
        commit marker, last."""
        if self.tar is not None:
            builder = PieceBuilder(self.tar_bytes)
            for smp in self.samples:
                builder.add(smp)
            path = os.path.join(out_dir, f"{self.stem}.cols.npy")
            builder.finish().save(path + ".tmp")
            os.replace(path + ".tmp", path)
        write_json_atomic(
            os.path.join(out_dir, f"{self.stem}.index.json"), self.to_json(format_version)
        )


@dataclass
class SegmentTask:
    """A finished segment for a worker to write: its samples' index entries (without member
    offsets) and, per sample, its members (JSON bytes, image bytes or spool references)."""

    out_dir: str
    format_version: int
    segment: Segment
    members: list[list[tuple[str, Payload]]]


def write_segment(task: SegmentTask) -> dict[str, Any]:
    """Write a segment's tar, .idx, piece and (last, the commit) index.json; returns the
    index.json content. Runs in a worker; the tar layout is the one ShardWriter always writes."""
    seg = task.segment
    if task.members:
        writer = ShardWriter(task.out_dir, seg.stem)
        try:
            for meta, members in zip(seg.samples, task.members):
                placed = writer.add(members)
                meta["members"] = {m.name.split(".", 1)[1]: [m.offset, m.size] for m in placed}
            seg.tar, seg.idx, seg.tar_bytes = writer.finish()
        except BaseException:
            writer.abort()
            raise
    seg.commit(task.out_dir, task.format_version)
    return seg.to_json(task.format_version)


def load_segment(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sample_entry(key: str, r) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """Tar members and index entry of an accepted worker Result (data_tools.worker.Result).

    One image: `{key}.{ext}`; several: `{key}.{i}.{ext}` (i from 0, placeholder order); the
    text and metadata always in `{key}.json`. The index entry's `members` (offsets) is filled
    in by the caller once the bytes are placed."""
    many = len(r.images) > 1
    members: list[tuple[str, bytes]] = []
    images_meta, json_images = [], []
    for i, im in enumerate(r.images):
        ext = f"{i}.{im.ext}" if many else im.ext
        name = f"{key}.{ext}"
        members.append((name, im.data))
        common = {"width": im.width, "height": im.height, "converted_from": im.converted_from}
        json_images.append({"member": name, "path": r.image_refs[i], **common})
        images_meta.append(
            {
                "member": ext,
                **common,
                "orientation": im.orientation,
                "format": im.ext,
                "source_format": im.source_format,
                "path": r.image_refs[i],
                "digest": im.digest,
            }
        )
    doc = {"key": key, **r.content, "images": json_images, "source": r.source}
    members.append((f"{key}.json", json.dumps(doc, ensure_ascii=False).encode("utf-8")))
    meta = {
        "key": key,
        "kind": r.content["kind"],
        "num_images": len(r.images),
        "images": images_meta,
        "text_tokens": r.text_tokens,
        "source": r.source,
        "digest": r.digest,
    }
    return members, meta
