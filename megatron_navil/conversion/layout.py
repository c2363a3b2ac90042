"""The canonical model's sharded layout, for the streaming checkpoint writer.

How keys are named in our checkpoints (one per parameter and expert) is megatron_navil.checkpoint.
keys; this module builds, from the model code, what Megatron itself saves for a model config:

- `canonical_sharded_layout(cfg, dtype)`: the exact ShardedTensor / ShardedObject list that
  Megatron itself would save for the canonical model, taken from the model's own
  `sharded_state_dict()` built on the meta device (no memory). Used by the writer, so what we
  write is by construction what Megatron writes. Needs a 1-process model-parallel world.
Tests check that it and keys.stored_parts agree for every model variant and both full-size
flavors.
"""

from __future__ import annotations

import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_navil.checkpoint.keys import SHARDING_METADATA, CanonicalLayout, SlotView
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.utils import cpu_compat
from megatron_navil.utils.dtypes import dtype_name


class _AllOnMeta(TorchFunctionMode):
    """Every tensor a model constructor makes lands on the meta device, even where Megatron
    passes an explicit `device=` (GPU initialisation) or calls `.cuda()`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = "meta"
        if (
            func in (torch.Tensor.cuda, torch.Tensor.to)
            and isinstance(args[0], torch.Tensor)
            and args[0].device.type == "meta"
        ):
            return args[0]
        return func(*args, **kwargs)


_OWNED = {"world": False}


def ensure_single_process_world() -> None:
    """Megatron models need model-parallel groups: set up a 1-process gloo world if none
    (`release_single_process_world` tears down only a world made here)."""
    from megatron.core import parallel_state

    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.utils.distributed import initialize_model_parallel

    if torch.distributed.is_initialized():
        if (
            torch.distributed.get_world_size() != 1
            or not parallel_state.model_parallel_is_initialized()
            or parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
            or parallel_state.get_expert_model_parallel_world_size() != 1
        ):
            raise ConversionError(
                "writing a Megatron checkpoint from HF weights runs in one process "
                "(navil-convert); it cannot run inside a multi-process job"
            )
        return
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    # navil-convert's Megatron scope starts here: on CPU it needs the compatibility layer, which
    # `release_single_process_world` (destroy) turns off again.
    cpu_compat.activate()
    initialize_model_parallel(ParallelConfig(), seed=0)
    _OWNED["world"] = True


def release_single_process_world() -> None:
    """Tear down the world (and the CPU layer) `ensure_single_process_world` made, if any."""
    if _OWNED["world"]:
        from megatron_navil.utils.distributed import destroy

        destroy()
        _OWNED["world"] = False


def canonical_sharded_layout(cfg: NaViLModelConfig, dtype: torch.dtype) -> CanonicalLayout:
    """The canonical model's sharded state dict, from a meta-device model (no memory used)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
        is_main_replica,
    )

    from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
    from megatron_navil.models.navil import NaViLModel

    ensure_single_process_world()
    name = dtype_name(dtype)
    with torch.device("meta"), _AllOnMeta():
        model = NaViLModel(
            cfg, ParallelConfig(), PrecisionConfig(backend="local", params_dtype=name)
        )
    params = {
        k: p for k, p in model.state_dict(keep_vars=True).items() if isinstance(p, torch.Tensor)
    }
    by_storage = {p.untyped_storage()._cdata: k for k, p in params.items()}
    sharded = {"model": model.sharded_state_dict(metadata=dict(SHARDING_METADATA))}
    apply_factories(sharded)
    tensors, views, objects = [], [], {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            if not is_main_replica(item.replica_id):
                continue  # Megatron saves one copy of replicated tensors
            data = item.data
            views.append(
                SlotView(
                    by_storage[data.untyped_storage()._cdata],
                    tuple(data.size()),
                    tuple(data.stride()),
                    data.storage_offset(),
                )
            )
            tensors.append(item)
        elif isinstance(item, ShardedObject):
            if not is_main_replica(item.replica_id):
                continue
            objects.setdefault(item.unique_key, []).append(item)
        else:
            raise TypeError(f"unexpected item in the model's sharded state dict: {type(item)}")
    shapes = {
        k: (tuple(p.shape), p.dtype) for k, p in params.items() if not k.endswith("_extra_state")
    }
    return CanonicalLayout(tensors, views, objects, shapes)
