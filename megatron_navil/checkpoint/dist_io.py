"""Streaming read/write of Megatron torch_dist checkpoints, one tensor at a time.

Megatron's own `dist_checkpointing.save` stages the whole state dict in memory before writing,
and `load` materialises every requested tensor at once, and both are collective over the
default process group. Conversion needs neither: it drives torch.distributed.checkpoint (the
format under torch_dist) directly, without a process group (`no_dist=True`):

- writing: the write plan is the canonical model's sharded layout (keys.CanonicalLayout, built
  by conversion/layout.py: what Megatron would save, from a meta-device model); a custom save
  planner produces each tensor only when the file writer asks for it (`resolve_data`), from a
  callback that reads/transforms the HF source. One canonical parameter is alive at a time
  (gate/up halves of a SwiGLU weight are consecutive items and share it).
- reading: a load planner asks for the region of the stored global tensor that one canonical
  parameter occupies (e.g. layer 3, expert 1 of `...experts.experts.linear_fc1.weight`), read
  into a fresh tensor: the reader's memory is one parameter.
Megatron's `metadata.json` and `common.pt` are written as Megatron writes them, so
`dist_checkpointing.load` (and checkpoint.load_model) read the result at any TP/PP/EP.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_navil.checkpoint import integrity
from megatron_navil.checkpoint.format import CheckpointError
from megatron_navil.checkpoint.keys import CanonicalLayout, stored_parts
from megatron_navil.checkpoint.safe_load import weights_only_loads
from megatron_navil.utils.memory import release_freed_memory

Producer = Callable[[str], torch.Tensor]
COMMON_FILE = "common.pt"
TRIM_BYTES = 1024 * 1024  # give memory back to the OS after parameters at least this big
MCORE_CONFIG_FILE = "metadata.json"


@contextlib.contextmanager
def _quiet():
    """no_dist=True is intended here (no process group needed); DCP warns about it each call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _StreamingSavePlanner(DefaultSavePlanner):
    """Save plan = the given write items; tensor data is produced on demand."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._resolve = items, resolve

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._resolve(write_item)


def write_dist_checkpoint(
    iter_dir: Path,
    layout: CanonicalLayout,
    produce: Producer,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> None:
    """Write one torch_dist checkpoint directory; `produce(name)` returns the canonical tensor
    of parameter `name` (shape and dtype as in `layout.params`). The writer takes ownership of
    what `produce` returns and frees its memory once written: return a fresh tensor."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    items, slots, objects = [], {}, {}
    for st, view in zip(layout.tensors, layout.views):
        offsets = torch.Size(st.global_offset)
        sizes = torch.Size((1,) * st.prepend_axis_num + tuple(st.local_shape))
        props = TensorProperties(dtype=st.dtype, requires_grad=False)
        items.append(
            WriteItem(
                index=MetadataIndex(st.key, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets, sizes),
                    properties=props,
                    size=torch.Size(st.global_shape),
                ),
            )
        )
        slots[(st.key, offsets)] = (view, sizes)
    for key, objs in layout.objects.items():
        # Megatron stores each ShardedObject group as torch.save([obj.data, ...]) bytes.
        buf = io.BytesIO()
        torch.save([o.data for o in objs], buf)
        objects[key] = buf
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))

    cache: dict[str, torch.Tensor] = {}
    handed_out: list[torch.Tensor] = []

    def resolve(item: WriteItem):
        # The writer (serial loader, see below) has written every tensor handed out before this
        # call. torch's DCP file writer keeps a reference to each written tensor until its file
        # is closed (a dict it only needs for its safetensors format), which would pin one slice
        # per key plus the embeddings; we own those tensors, so we free their memory here.
        for t in handed_out:
            _free(t)
        handed_out.clear()
        if item.type == WriteItemType.BYTE_IO:
            return objects[item.index.fqn]
        view, sizes = slots[(item.index.fqn, item.index.offset)]
        if view.param not in cache:
            if cache:
                (old,) = cache.values()
                cache.clear()  # one canonical parameter alive at a time
                _free(old)
                if old.nbytes >= TRIM_BYTES:
                    release_freed_memory()
            shape, dtype = layout.params[view.param]
            t = produce(view.param)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(
                    f"{view.param}: produced {t.dtype} {list(t.shape)}, the model "
                    f"needs {dtype} {list(shape)}"
                )
            cache[view.param] = t.contiguous()
        full = cache[view.param]
        if math.prod(view.size) == full.numel():  # the whole parameter: no copy
            out = full.view(sizes)
        else:  # part of it (the gate or up half of a SwiGLU weight)
            out = full.as_strided(view.size, view.stride, view.offset).reshape(sizes).clone()
            handed_out.append(out)
        if on_bytes is not None:
            on_bytes(out.numel() * out.element_size())
        return out

    iter_dir.mkdir(parents=True, exist_ok=True)
    # One thread and no copy-ahead: the serial loader asks for item i+1 only after writing item
    # i, which is what lets `resolve` free written tensors (and keeps one parameter alive).
    writer = dcp.FileSystemWriter(
        str(iter_dir),
        single_file_per_rank=True,
        thread_count=1,
        sync_files=True,
        per_thread_copy_ahead=0,
    )
    with _quiet():
        dcp.save(
            {}, storage_writer=writer, planner=_StreamingSavePlanner(items, resolve), no_dist=True
        )
    cache.clear()
    torch.save({}, iter_dir / COMMON_FILE)  # the model holds no non-sharded state
    save_config(CheckpointingConfig("torch_dist", 1), str(iter_dir))


def _free(t: torch.Tensor) -> None:
    """Release a tensor's memory even while others still reference the tensor object."""
    try:
        t.untyped_storage().resize_(0)
    except RuntimeError:  # storage shared with numpy / external memory: freed when unreferenced
        pass


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads the requested regions of stored global tensors into given destination tensors."""

    def __init__(self, regions: dict[tuple[str, torch.Size], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), dest in self._regions.items():
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=dest.shape)
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk]
            )
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._regions[(index.fqn, index.offset)]


class DistCheckpointReader:
    """Canonical parameters of one torch_dist checkpoint directory (`iter_*`), read lazily."""

    def __init__(self, iter_dir: Path):
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
            CachedMetadataFileSystemReader,
        )

        self.dir = Path(iter_dir)
        config = self.dir / MCORE_CONFIG_FILE
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(
                f"{config} is missing or unreadable: {self.dir} is not a Megatron "
                "dist checkpoint (or its save did not finish)"
            ) from None
        if backend != "torch_dist":
            raise CheckpointError(
                f"{self.dir} uses sharded backend {backend!r}; only torch_dist "
                "checkpoints are supported"
            )
        integrity.read_storage_metadata(self.dir)  # refuses a crafted pickle first
        self.reader = CachedMetadataFileSystemReader(str(self.dir))
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as e:  # a missing or truncated .metadata pickle
            raise CheckpointError(
                f"cannot read {self.dir / '.metadata'} ({type(e).__name__}); the "
                "checkpoint is incomplete or corrupt"
            ) from None
        integrity.check_files(self.dir, self.metadata)

    def tensor_keys(self) -> list[str]:
        """Stored model tensor keys (no `_extra_state` byte objects, no optimizer state)."""
        return [
            k
            for k, md in self.metadata.state_dict_metadata.items()
            if not isinstance(md, BytesStorageMetadata) and not k.startswith("optimizer.")
        ]

    def parts(self, name: str) -> list[str]:
        return stored_parts(self.metadata.state_dict_metadata, name)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of canonical parameter `name`; CheckpointError if not stored."""
        shapes, dtype = [], None
        for key in self.parts(name):
            md = self.metadata.state_dict_metadata.get(key)
            if md is None or isinstance(md, BytesStorageMetadata):
                raise CheckpointError(
                    f"{self.dir} has no tensor {key} (needed for {name}); the "
                    "checkpoint does not match the model config in its "
                    "navil_checkpoint.json"
                )
            shapes.append(tuple(md.size))
            dtype = md.properties.dtype
        if len(shapes) == 1:
            return shapes[0], dtype
        return (sum(s[0] for s in shapes),) + shapes[0][1:], dtype

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the given canonical parameters (one DCP read pass)."""
        regions, out = {}, {}
        for name in names:
            shape, dtype = self.info(name)
            out[name] = torch.empty(shape, dtype=dtype)
            row = 0
            for key in self.parts(name):
                size = tuple(self.metadata.state_dict_metadata[key].size)
                regions[(key, torch.Size((0,) * len(size)))] = out[name][row : row + size[0]]
                row += size[0]
        try:
            with _quiet(), weights_only_loads():
                dcp.load(
                    {},
                    storage_reader=self.reader,
                    planner=_RegionLoadPlanner(regions),
                    no_dist=True,
                )
        except CheckpointError:
            raise
        except Exception as e:  # torch.load on a corrupt item, short reads
            raise CheckpointError(
                f"reading {', '.join(names[:3])} from {self.dir} failed: {type(e).__name__}: {e}"
            ) from None
        return out
