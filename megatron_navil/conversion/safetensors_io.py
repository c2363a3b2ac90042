"""Streaming safetensors: validated lazy reading and planned, sharded writing with an index.

Reading parses each file's header ourselves (8-byte length + JSON) and reads one tensor at a
time with plain positioned reads into a fresh buffer. We avoid mmap on purpose: pages of a
memory-mapped shard stay in the process's resident set while the mapping lives, so converting a
5 GB shard through mmap shows 5 GB of RSS; a read-into-buffer holds one tensor.
Every header is validated up front (dtype, shape x itemsize = byte length, contiguous offsets,
file long enough), so a truncated or corrupt file fails before any output is written, naming
the file and tensor.

Writing follows a plan (name, dtype, shape) known before any data: shards are assigned
greedily in plan order, each file's header is written when the file is opened, and tensors are
streamed into it in plan order: nothing is buffered beyond the tensor being written.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import torch

from megatron_navil.conversion.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default max_shard_size ("5GB")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) of `file`."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Union[str, Path]) -> dict[str, TensorInfo]:
    """Validated tensor table of one .safetensors file (no tensor data is read)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and 8 + n <= size else None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None
    if raw is None:
        raise ConversionError(
            f"{path} is truncated or not a safetensors file ({size} bytes, header "
            "incomplete); re-download or re-export it"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(
            f"{path}: corrupt safetensors header (not JSON); re-download or re-export it"
        ) from None
    base, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype")) if isinstance(meta, dict) else None
        try:
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name!r} has an invalid header entry {meta!r}")
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ConversionError(
                f"{path}: tensor {name!r} has {end - begin} bytes but its shape "
                f"{list(shape)} x {dtype} needs {expected}; the file is corrupt"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    pos = base
    for info in sorted(out.values(), key=lambda i: i.start):
        if info.start != pos:
            raise ConversionError(
                f"{path}: tensor {info.name!r} does not start where the previous "
                "one ends; the file is corrupt"
            )
        pos = info.end
    if pos > size:
        last = max(out.values(), key=lambda i: i.end)
        raise ConversionError(
            f"{path} is truncated: {size} bytes, but tensor {last.name!r} ends "
            f"at byte {last.end}; re-download or re-export it"
        )
    return out


def plain_file_name(index: Path, name: object) -> str:
    """A file an index lists must be a plain name inside its directory (an index from elsewhere
    could name `../../x` or an absolute path)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ConversionError(f"{index} lists {name!r}, not a file name inside its directory")
    return name


class SafetensorsDir:
    """All tensors of a directory of safetensors files (sharded with an index, or not)."""

    def __init__(self, directory: Union[str, Path]):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir} is not a directory")
        index = self.dir / INDEX_FILE
        self.tensors: dict[str, TensorInfo] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({plain_file_name(index, n) for n in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConversionError(f"{index} is not a valid index (no weight_map)") from None
        else:
            weight_map, files = None, sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.dir} holds no *.safetensors files")
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise ConversionError(f"{index} lists {name}, which is missing from {self.dir}")
            for key, info in read_header(path).items():
                if key in self.tensors:
                    raise ConversionError(
                        f"tensor {key!r} is in both {self.tensors[key].file} and "
                        f"{path}; remove the duplicate shard"
                    )
                self.tensors[key] = info
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.tensors or Path(self.tensors[key].file).name != name:
                    raise ConversionError(
                        f"{index} says {key!r} is in {name}, which does not hold it"
                    )
            unindexed = sorted(set(self.tensors) - set(weight_map))
            if unindexed:
                raise ConversionError(
                    f"{self.tensors[unindexed[0]].file} holds {unindexed[0]!r} "
                    f"(and {len(unindexed) - 1} more) not listed in {index}"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.tensors[name]
        return t.shape, t.dtype

    def describe(self) -> str:
        return str(self.dir)

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a fresh, owned CPU tensor)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        # Read straight into the tensor's memory. Not via .numpy(): that marks the storage as
        # shared with numpy (not resizable), and the checkpoint writer frees written tensors by
        # resizing their storage.
        target = (
            (ctypes.c_char * info.nbytes).from_address(buf.data_ptr())
            if info.nbytes
            else bytearray()
        )
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(target).cast("B"))
        if got != info.nbytes:
            raise ConversionError(
                f"{info.file} is truncated: tensor {name!r} needs {info.nbytes} "
                f"bytes at offset {info.start}, read {got}"
            )
        return buf.view(info.dtype).reshape(info.shape)


class ShardedSafetensorsWriter:
    """Writes tensors, in a fixed plan order, into `model-0000i-of-0000n.safetensors` + index."""

    def __init__(
        self,
        out_dir: Union[str, Path],
        plan: Iterable[tuple[str, torch.dtype, tuple]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        prefix: str = "model",
    ):
        self.out_dir = Path(out_dir)
        self.plan = [(n, d, tuple(s)) for n, d, s in plan]
        shards: list[list[tuple[str, torch.dtype, tuple]]] = [[]]
        used = 0
        for entry in self.plan:
            nbytes = math.prod(entry[2]) * entry[1].itemsize
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(entry)
            used += nbytes
        count = len(shards)
        self.files = [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = shards
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, d, s in self.plan)
        self._pos = 0  # index into plan of the next tensor to write
        self._shard = -1
        self._file = None
        self._left_in_shard = 0

    def _open_next(self) -> None:
        self._close_file()
        self._shard += 1
        entries = self.shards[self._shard]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header so data starts 8-aligned
        self._file = open(self.out_dir / self.files[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._left_in_shard = len(entries)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write the next planned tensor; returns its byte count."""
        if self._pos >= len(self.plan):
            raise RuntimeError(f"tensor {name} is not in the write plan")
        want, dtype, shape = self.plan[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"write order broken: expected {want} {dtype} {list(shape)}, got "
                f"{name} {tensor.dtype} {list(tensor.shape)}"
            )
        if self._left_in_shard == 0:
            self._open_next()
        data = tensor.detach().contiguous().cpu()
        self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._pos += 1
        self._left_in_shard -= 1
        return data.numel() * data.element_size()

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must be written."""
        if self._pos != len(self.plan):
            raise RuntimeError(f"only {self._pos} of {len(self.plan)} planned tensors were written")
        self._close_file()
        weight_map = {n: self.files[i] for i, shard in enumerate(self.shards) for n, _, _ in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(self.out_dir / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def abort(self) -> None:
        self._close_file()
