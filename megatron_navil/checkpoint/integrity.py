"""Is a torch_dist checkpoint directory whole, and safe to unpickle? Named answers, not tracebacks.

- `read_storage_metadata(d)`: the `.metadata` file that torch.distributed.checkpoint writes is a
  plain pickle, which the library (and Megatron) load with `pickle.load`: a crafted file would
  run code. We read it first with an unpickler that only builds the checkpoint-metadata classes
  (and the torch dtypes, sizes and layouts they hold), so a file that needs anything else is
  refused before any library opens it.
- `check_files(d, metadata)`: every stored item must lie inside its `.distcp` file (a truncated
  or missing file is named with the first key it holds).
- `find_corrupt_item(d, metadata)`: after a failed load, decode the stored tensors one by one
  (`torch.load(weights_only=True)`) to name the file and key whose bytes are damaged.
- `record_digests(d)` / `verify_digests(d, recorded)`: torch.load does not check the CRCs of its
  zip records, so flipped bytes inside a tensor load silently as wrong weights. Each rank
  checksums (CRC32) the files it wrote when a save completes; the checkpoint metadata keeps them,
  and a load checks them first (the files are split over the ranks), naming a file that differs.
"""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_navil.checkpoint.format import CheckpointError

STORAGE_METADATA = ".metadata"

# torch.distributed.checkpoint modules whose classes a storage-metadata pickle may build (plain
# dataclasses and enums: constructing them runs no code of the file's choosing).
_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
}
_OTHER = {
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id of a checkpoint written to a path object
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if self._allowed(module, name) else None
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _OTHER:
            return True
        if module in _DCP_MODULES:
            return not name.startswith("__")
        if module == "torch":
            obj = getattr(torch, name, None)
            return obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout))
        return False


def read_storage_metadata(d: Path):
    """The checkpoint's storage metadata (torch.distributed.checkpoint `Metadata`), read with the
    restricted unpickler; CheckpointError naming the file when it is missing, damaged or holds
    anything but metadata."""
    path = Path(d) / STORAGE_METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not checkpoint metadata ({e}); refusing to load it")
    except Exception as e:  # EOFError, truncated opcodes, ...
        raise CheckpointError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:100]}); the checkpoint is "
            "incomplete or corrupt"
        ) from None


def check_files(d: Path, metadata) -> None:
    """Every stored item must lie inside its file: catches missing and truncated `.distcp`
    files before anything is read."""
    need: dict[str, tuple[int, str]] = {}
    for index, info in metadata.storage_data.items():
        end = info.offset + info.length
        if end > need.get(info.relative_path, (0, ""))[0]:
            need[info.relative_path] = (end, index.fqn)
    for name, (end, key) in sorted(need.items()):
        path = Path(d) / name
        size = path.stat().st_size if path.exists() else None
        if size is None:
            raise CheckpointError(f"{path} is missing (it holds {key}); copy the whole checkpoint")
        if size < end:
            raise CheckpointError(
                f"{path} is truncated: {size} bytes, but {key} ends at byte {end}; the "
                "checkpoint is incomplete"
            )


def find_corrupt_item(d: Path, metadata) -> Optional[str]:
    """`<file> (key <k>)` of the first stored tensor whose bytes do not decode, or None."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {
        k for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
    }
    items = sorted(
        (info.relative_path, info.offset, info.length, index.fqn)
        for index, info in metadata.storage_data.items()
        if index.fqn in tensors
    )
    handles: dict[str, Any] = {}
    try:
        for name, offset, length, key in items:
            f = handles.get(name) or handles.setdefault(name, open(Path(d) / name, "rb"))
            f.seek(offset)
            try:
                torch.load(io.BytesIO(f.read(length)), map_location="cpu", weights_only=True)
            except Exception:
                return f"{Path(d) / name} (key {key})"
    finally:
        for f in handles.values():
            f.close()
    return None


def _crc32(path: Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _gather(obj) -> list:
    world, _ = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def record_digests(d: Path) -> dict[str, dict[str, Any]]:
    """Collective: {file name: {"size", "crc32"}} of every file of the checkpoint `d` that
    torch_dist wrote. Each rank checksums its own shard files (`__<rank>_*.distcp`), rank 0 also
    the shared ones."""
    world, rank = _world()
    d = Path(d)
    names = [p.name for p in d.glob(f"__{rank}_*.distcp")]
    if rank == 0:
        names += [n for n in (STORAGE_METADATA, "common.pt", "metadata.json") if (d / n).exists()]
    mine = {n: {"size": (d / n).stat().st_size, "crc32": _crc32(d / n)} for n in names}
    merged: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def verify_digests(d: Path, recorded: dict[str, dict[str, Any]]) -> None:
    """Collective: every recorded file has its size and CRC32 (each rank checks its share);
    CheckpointError on every rank naming the first file that differs."""
    world, rank = _world()
    bad = None
    for name, want in list(recorded.items())[rank::world]:
        path = Path(d) / name
        if not path.exists():
            bad = f"{path} is missing"
        elif path.stat().st_size != want["size"]:
            size = path.stat().st_size
            bad = f"{path} has {size} bytes, {want['size']} when saved (truncated or overwritten)"
        elif _crc32(path) != want["crc32"]:
            bad = f"{path} is corrupt (CRC32 differs from the one recorded at save)"
        if bad:
            break
    found = [b for b in _gather(bad) if b]
    if found:
        raise CheckpointError(found[0], same_on_every_rank=True)
