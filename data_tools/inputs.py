"""Input discovery and deterministic enumeration, with byte-range partitioning.

Every input record gets a *position* in one global byte space: the sorted input files laid end to
end. A JSONL line's position is the byte where it starts; the j-th element of a JSON array file of
n elements sits at `start + j * size // n`; the k-th image of an image folder at `start +` the
bytes of the images before it. Partition i of K owns positions `[i*T//K, (i+1)*T//K)` (T = total
bytes). So every record belongs to exactly one partition, partitions are balanced by bytes, and a
partition reads only its byte range of a big JSONL file (it seeks there), whether the corpus is
one huge file or thousands of small ones (what a SLURM array over a glob needs).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from data_tools.cli_common import UsageError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".jp2",
    ".ppm",
    ".pgm",
    ".heic",
    ".avif",
    ".ico",
)
"""Files an image folder enumerates as samples (anything PIL cannot open is rejected later as
`unsupported_format`, so listing a format here never silently drops a sample)."""
RECORD_EXTENSIONS = (".jsonl", ".json")
_READ_CHUNK = 1 << 22


@dataclass(frozen=True)
class InputFile:
    """One input: a JSONL file, a JSON array file, or a folder of images with .txt sidecars."""

    path: str
    """Absolute path."""
    rel: str
    """Path relative to the input root (what `source.file` records)."""
    kind: str
    """`jsonl`, `json` or `imagefolder`."""
    size: int
    """Weight in the global byte space: file size, or total image bytes for a folder."""
    start: int = 0
    """Offset of this input in the global byte space."""


@dataclass
class RawRecord:
    """One input record before parsing (parsing happens in the worker processes)."""

    ordinal: int
    """0-based index in this partition's enumeration (what resume counts)."""
    source: dict[str, Any]
    """`{"file": rel, "line": n}` (JSONL, 1-based), `{"file", "index"}` (JSON array) or
    `{"file": rel image path}` (image folder)."""
    line: Optional[str] = None
    """Raw JSONL line (parsed by the worker)."""
    obj: Any = None
    """Already-parsed record (JSON array element, or an image-folder caption record)."""
    base_dir: str = ""
    """Directory that relative image paths are resolved against."""
    error: Optional[tuple[str, str]] = None
    """(reason, detail) when the record is bad before parsing (e.g. a JSON file that is not
    valid JSON): it is counted as read and rejected."""


def discover(inputs: Sequence[str]) -> tuple[str, list[InputFile]]:
    """Expand files/globs/folders into a sorted, de-duplicated input list and its common root."""
    paths: list[tuple[str, str]] = []  # (abs path, kind)
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise UsageError(f"--input {spec!r} matches no file; check the path or quote the glob")
        for m in matches:
            if os.path.isdir(m):
                paths.extend(_scan_dir(m))
            elif os.path.isfile(m):
                ext = os.path.splitext(m)[1].lower()
                kind = "json" if ext == ".json" else "jsonl"
                paths.append((os.path.abspath(m), kind))
            else:
                raise UsageError(
                    f"--input {m!r} does not exist; pass a JSONL/JSON file, a glob or a folder"
                )
    if not paths:
        raise UsageError(f"--input {' '.join(inputs)!r} holds no .jsonl/.json files or images")
    uniq = sorted(set(paths))
    for p, _ in uniq:
        if not os.access(p, os.R_OK):
            raise UsageError(f"input {p!r} is not readable; fix its permissions")
    dirs = [p if k == "imagefolder" else os.path.dirname(p) for p, k in uniq]
    root = os.path.commonpath(dirs)
    files, start = [], 0
    for p, kind in uniq:
        size = _folder_bytes(p) if kind == "imagefolder" else os.path.getsize(p)
        files.append(InputFile(p, os.path.relpath(p, root), kind, size, start))
        start += size
    return root, files


def _scan_dir(d: str) -> list[tuple[str, str]]:
    """A folder holding .jsonl/.json files is a folder of record files, else an image folder."""
    records = [
        os.path.abspath(os.path.join(d, n))
        for n in sorted(os.listdir(d))
        if os.path.splitext(n)[1].lower() in RECORD_EXTENSIONS and not n.startswith(".")
    ]
    if records:
        return [(p, "json" if p.lower().endswith(".json") else "jsonl") for p in records]
    return [(os.path.abspath(d), "imagefolder")]


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive), as sorted relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        for n in filenames:
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(dirpath, n), folder))
    return sorted(out)


def _weight(path: str) -> int:
    # Zero-byte images weigh 1 so positions stay strictly increasing and inside the folder's span.
    return max(os.path.getsize(path), 1)


def _folder_bytes(folder: str) -> int:
    return sum(_weight(os.path.join(folder, r)) for r in list_images(folder))


def partition_bounds(total: int, num_partitions: int, index: int) -> tuple[int, int]:
    """Half-open byte range of the global position space owned by partition `index`."""
    return index * total // num_partitions, (index + 1) * total // num_partitions


def iter_records(
    files: Sequence[InputFile],
    lo: int,
    hi: int,
    image_root: Optional[str],
    max_line_bytes: Optional[int] = None,
) -> Iterator[RawRecord]:
    """Records whose position lies in [lo, hi), in deterministic order. A JSONL line longer
    than `max_line_bytes` is never held in memory: it becomes a `json_too_large` rejection."""
    ordinal = 0
    for f in files:
        a, b = max(lo, f.start) - f.start, min(hi, f.start + f.size) - f.start
        if a >= b:
            continue
        base = image_root or (f.path if f.kind == "imagefolder" else os.path.dirname(f.path))
        if f.kind == "jsonl":
            gen = _iter_jsonl(f, a, b, base, max_line_bytes)
        elif f.kind == "json":
            gen = _iter_json(f, a, b, base)
        else:
            gen = _iter_folder(f, a, b, base)
        for rec in gen:
            rec.ordinal = ordinal
            ordinal += 1
            yield rec


def _read_line(fh, limit: Optional[int]) -> tuple[Optional[bytes], int]:
    """(the line, its length in bytes). A line longer than `limit` + a CRLF is not kept: the
    rest of it is skipped in bounded chunks and (None, its length) is returned, so a 10 GB line
    costs no memory."""
    if limit is None:
        raw = fh.readline()
        return raw, len(raw)
    raw = fh.readline(limit + 2)
    if len(raw) < limit + 2 or raw.endswith(b"\n"):
        return raw, len(raw)
    n = len(raw)
    while True:  # the line goes on: count it out without keeping it
        part = fh.readline(_READ_CHUNK)
        n += len(part)
        if not part or part.endswith(b"\n"):
            return None, n


def _iter_jsonl(
    f: InputFile, a: int, b: int, base: str, limit: Optional[int] = None
) -> Iterator[RawRecord]:
    with open(f.path, "rb") as fh:
        line_no = 1
        pos = 0
        if a > 0:
            # A line belongs to the partition holding its first byte: skip the tail of a line
            # that started before `a`. Line numbers need the newlines before it (one prefix read).
            fh.seek(a - 1)
            if fh.read(1) != b"\n":
                fh.readline()
            pos = fh.tell()
            line_no = 1 + _count_newlines(f.path, pos)
        fh.seek(pos)
        while pos < b:
            raw, n = _read_line(fh, limit)
            if not n:
                break
            pos += n
            text = raw.strip() if raw is not None else None
            if text is None or limit is not None and len(text) > limit:
                yield RawRecord(
                    0,
                    {"file": f.rel, "line": line_no},
                    base_dir=base,
                    error=("json_too_large", f"line of {n} bytes > --max-json-bytes {limit}"),
                )
            elif text:
                try:
                    line = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRecord(
                        0,
                        {"file": f.rel, "line": line_no},
                        base_dir=base,
                        error=("malformed_json", f"not UTF-8: {e}"),
                    )
                else:
                    yield RawRecord(0, {"file": f.rel, "line": line_no}, line=line, base_dir=base)
            line_no += 1


def _count_newlines(path: str, end: int) -> int:
    n, left = 0, end
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(_READ_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _iter_json(f: InputFile, a: int, b: int, base: str) -> Iterator[RawRecord]:
    try:
        with open(f.path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        # The whole file is one unreadable record: counted once, by the partition owning byte 0.
        if a == 0:
            yield RawRecord(
                0,
                {"file": f.rel, "index": 0},
                base_dir=base,
                error=("malformed_json", f"file is not valid JSON: {e}"),
            )
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        if a == 0:
            yield RawRecord(
                0,
                {"file": f.rel, "index": 0},
                base_dir=base,
                error=("malformed_record", "JSON file is neither an array nor an object"),
            )
        return
    n = len(data)
    for j, obj in enumerate(data):
        p = j * f.size // n
        if a <= p < b:
            yield RawRecord(0, {"file": f.rel, "index": j}, obj=obj, base_dir=base)


def _iter_folder(f: InputFile, a: int, b: int, base: str) -> Iterator[RawRecord]:
    pos = 0
    for rel in list_images(f.path):
        full = os.path.join(f.path, rel)
        if a <= pos < b:
            sidecar = os.path.splitext(full)[0] + ".txt"
            yield RawRecord(
                0,
                {"file": os.path.join(f.rel, rel)},
                obj={"image": rel, "_sidecar": sidecar},
                base_dir=f.path,
            )
        pos += _weight(full)
