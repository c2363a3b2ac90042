"""Model checkpoints in Megatron's dist_checkpointing (torch_dist) format.

On disk, under a checkpoint root:
    latest_checkpointed_iteration.txt     the step of the newest COMPLETE checkpoint
    iter_0000100/                         one dist checkpoint (layout-free: loads at any TP/PP/EP)
        navil_checkpoint.json             step, resolved model config, the layout it was saved at
        tokenizer/                        the tokenizer files the run trains with (navil-pretrain)
        <torch_dist shards + metadata>
The sharded state dict holds `model` (or `model0`, `model1`, ... with virtual pipeline stages).
The `latest` pointer is replaced atomically only after every rank finished writing, so a crash
mid-save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.errors import UserError
from megatron_navil.utils.distributed import barrier, is_rank0
from megatron_navil.utils.files import write_text_atomic
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "navil_checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path/keys and what to do."""


def iteration_dir(root: Union[str, Path], step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def read_latest(root: Union[str, Path]) -> Optional[int]:
    """Step of the newest complete checkpoint under `root`, or None when there is none."""
    p = Path(root) / LATEST
    if not p.exists():
        return None
    text = p.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{p} should hold a step number, found {text[:40]!r}")
    return int(text)


def resolve(path: Union[str, Path]) -> Path:
    """A checkpoint root (uses its latest pointer) or an iter_* directory -> the iter_* dir."""
    path = Path(path)
    if (path / METADATA).exists():
        return path
    step = read_latest(path)
    if step is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected {LATEST} (a checkpoint root) or {METADATA} "
            "(an iter_* directory)"
        )
    d = iteration_dir(path, step)
    if not (d / METADATA).exists():
        raise CheckpointError(f"{path / LATEST} points at step {step} but {d} is incomplete")
    return d


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    with open(resolve(path) / METADATA) as f:
        return json.load(f)


# One checkpoint key per parameter (per layer, per expert) instead of Megatron's default of
# stacking layers and experts along extra axes: a training stage that freezes some experts
# (e.g. the text FFN) then saves optimizer state for exactly the trained ones, and the HF
# conversion reads parameters one by one. TP shards are still resharded by dist_checkpointing.
SHARDING_METADATA = {"singleton_local_shards": True}


def _model_chunks(chunks: list) -> list[tuple[str, torch.nn.Module]]:
    """(state key, unwrapped module) per model chunk: `model`, or `model0..` with virtual PP."""
    unwrap = [c.module if hasattr(c, "module") else c for c in chunks]
    if len(unwrap) == 1:
        return [("model", unwrap[0])]
    return [(f"model{i}", c) for i, c in enumerate(unwrap)]


def model_sharded_state_dict(chunks: list) -> dict:
    return {k: c.sharded_state_dict(metadata=dict(SHARDING_METADATA)) for k, c in _model_chunks(chunks)}


def load_model_state(loaded: dict, chunks: list) -> None:
    """Copy the model entries of a loaded state (checkpoint.load) into `chunks`."""
    for key, chunk in _model_chunks(chunks):
        chunk.load_state_dict(loaded[key], strict=False)


TOKENIZER_DIR = "tokenizer"


def tokenizer_source(path: Union[str, Path]) -> Path:
    """The directory of a tokenizer given as a directory or as one of its files."""
    path = Path(path)
    return path.parent if path.is_file() else path


def tokenizer_file_names(directory: Path) -> list[str]:
    """The tokenizer files (sentencepiece / BPE files, HF configs, NaViL metadata) in `directory`."""
    from megatron_navil.conversion.tokenizer_files import COPIED

    return [n for n in COPIED if (directory / n).is_file()]


def tokenizer_digest(directory: Union[str, Path]) -> str:
    """sha256 over the names and bytes of a tokenizer directory's files (what resume compares)."""
    import hashlib

    d, h = tokenizer_source(directory), hashlib.sha256()
    for name in tokenizer_file_names(d):
        h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()


def _copy_tokenizer(src: Path, dest: Path) -> None:
    import shutil

    dest.mkdir(exist_ok=True)
    for name in tokenizer_file_names(src):
        shutil.copyfile(src / name, dest / name)


def save(root: Union[str, Path], step: int, sharded_state: dict, model_cfg: NaViLModelConfig,
         extra_metadata: Optional[dict] = None, async_queue=None,
         on_complete: Optional[Callable[[Path], None]] = None,
         tokenizer: Optional[Union[str, Path]] = None) -> Path:
    """Write `sharded_state` (from model_sharded_state_dict, plus optimizer etc.) as step `step`.

    The metadata file and the `latest` pointer are written only once every rank has finished
    (after the background write completes when `async_queue` is given); `on_complete(dir)` runs
    then on rank 0 (pruning old checkpoints, the HF export). `tokenizer` (a directory or one of
    its files): copied into `iter_*/tokenizer/` before the metadata, its digest recorded, so
    the checkpoint carries the tokenizer it was trained with."""
    from megatron.core import dist_checkpointing

    d = iteration_dir(root, step)
    if is_rank0():
        d.mkdir(parents=True, exist_ok=True)
        stale = d / METADATA
        if stale.exists():  # overwriting a step: it is incomplete until the metadata returns
            stale.unlink()
    barrier()
    meta = {"format_version": FORMAT_VERSION, "step": step, "model": model_cfg.to_dict(),
            **(extra_metadata or {})}
    if tokenizer is not None:
        meta["tokenizer_sha256"] = tokenizer_digest(tokenizer)

    def finalize():
        if is_rank0():
            if tokenizer is not None:
                _copy_tokenizer(tokenizer_source(tokenizer), d / TOKENIZER_DIR)
            write_text_atomic(d / METADATA, json.dumps(meta, indent=2))
            write_text_atomic(Path(root) / LATEST, str(step))
            log.info("saved checkpoint %s", d)
            if on_complete is not None:
                on_complete(d)

    if async_queue is None:
        dist_checkpointing.save(sharded_state, str(d))
        barrier()
        finalize()
        barrier()
    else:
        request = dist_checkpointing.save(sharded_state, str(d), async_sharded_save=True)
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return d


def hf_export_dir(iteration: Path) -> Path:
    """Where `--save-hf` writes the HF copy of checkpoint directory `iteration`."""
    return iteration.parent / f"hf_{iteration.name}"


def prune(root: Union[str, Path], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never the latest one), and
    their `--save-hf` copies."""
    import shutil

    if keep_last <= 0 or not is_rank0():
        return []
    complete = sorted(p for p in Path(root).glob("iter_*") if (p / METADATA).exists())
    latest = read_latest(root)
    removed = []
    for p in complete[:-keep_last]:
        if latest is not None and p == iteration_dir(root, latest):
            continue
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(hf_export_dir(p), ignore_errors=True)
        removed.append(p)
    return removed


def model_config_diffs(saved: dict, current: NaViLModelConfig) -> list[str]:
    """`field: checkpoint X vs config Y` for every shape-relevant field that differs."""
    diffs = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{k}.")
            elif va != vb and k not in _NON_SHAPE_FIELDS:
                diffs.append(f"{prefix}{k}: checkpoint {va!r} vs config {vb!r}")

    walk(saved, current.to_dict(), "")
    return diffs


def check_model_config(saved: dict, current: NaViLModelConfig, path: Path) -> None:
    """Refuse a checkpoint of another model shape, naming the fields that differ."""
    diffs = model_config_diffs(saved, current)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model:\n  " + "\n  ".join(diffs)
            + "\nuse the matching --model config / flavor, or convert the checkpoint"
        )


# Fields that change behaviour or data handling but not parameter shapes.
_NON_SHAPE_FIELDS = {"init_method_std", "visual_init", "max_sequence_length", "rope_theta",
                     "template", "min_dynamic_patch", "max_dynamic_patch", "scale_downsample_ratio",
                     "layerscale_init", "norm_eps", "layernorm_eps", "keep_window_order",
                     "window_size", "fullatt_block_indexes"}


EXTRA_STATE = "_extra_state"
"""Key suffix of Transformer Engine's per-module metadata (FP8 scales and amax history)."""


def _missing_keys_error(d: Path, keys: list[str]) -> CheckpointError:
    shown = "\n  ".join(keys[:5])
    more = f"\n  ... and {len(keys) - 5} more" if len(keys) > 5 else ""
    return CheckpointError(
        f"cannot load {d}: {len(keys)} tensors this run needs are not in the checkpoint:\n  "
        f"{shown}{more}\nit was saved by a model of another structure (flavor, experts, overrides), "
        "or by a training stage that froze parts this one trains (start a new stage with "
        "--finetune); use the matching config, or convert it with navil-convert")


def _agree_on_failure(local_bad: int) -> int:
    """Largest count of missing keys over all ranks, so every rank refuses together instead of
    some ranks going on to a collective the refusing ones never reach."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local_bad
    t = torch.tensor([local_bad], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _absent_keys(d: Path, sharded_state: dict) -> set[str]:
    """Keys `sharded_state` requests that checkpoint `d` does not hold (after factories, as
    dist_checkpointing resolves them), read from the checkpoint's metadata only."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    stored = {sh.key for sh in load_sharded_metadata(str(d)).values()}
    requested, _, _ = load_preprocess(sharded_state)
    return {x.key for x in nested_values(requested) if isinstance(x, ShardedBase)} - stored


def load(path: Union[str, Path], sharded_state: dict, model_cfg: Optional[NaViLModelConfig] = None) -> tuple[dict, dict]:
    """Load a checkpoint into the structure `sharded_state` describes (any parallel layout).

    Returns (loaded state dict, metadata). Requested tensors the checkpoint lacks are refused
    before anything is read, on every rank, with one message naming how many and the first few.
    Missing `_extra_state` entries are tolerated: Transformer Engine modules ask for their FP8
    metadata, which checkpoints of the local backend and of navil-convert do not have (starting
    GPU training from a converted LLM or from a CPU checkpoint); those modules keep their fresh
    scaling state, as at initialisation.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    d = resolve(path)
    meta = read_metadata(d)
    if model_cfg is not None:
        check_model_config(meta["model"], model_cfg, d)
    try:
        absent = _absent_keys(d, sharded_state)
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {d}: {e}") from e
    missing = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if _agree_on_failure(len(missing)):
        if missing:
            raise _missing_keys_error(d, missing)
        raise CheckpointError(f"cannot load {d}: another rank is missing tensors (see its error)")
    extra = absent - set(missing)
    if extra:
        _, sharded_state = extract_matching_values(
            sharded_state, lambda x: isinstance(x, ShardedObject) and x.key in extra)
        log.info("%s has no Transformer Engine metadata (_extra_state) for %d modules (a "
                 "local-backend or converted checkpoint): their FP8 scaling state starts fresh",
                 d, len(extra))
    try:
        state = dist_checkpointing.load(sharded_state, str(d),
                                        strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except Exception as e:  # dist_checkpointing raises several types; name the checkpoint
        raise CheckpointError(f"cannot load {d}: {e}") from e
    return state, meta


def load_model(path: Union[str, Path], chunks: list, model_cfg: Optional[NaViLModelConfig] = None) -> dict:
    """Load model weights (only) into `chunks`; returns the checkpoint metadata."""
    state, meta = load(path, model_sharded_state_dict(chunks), model_cfg)
    load_model_state(state, chunks)
    return meta
