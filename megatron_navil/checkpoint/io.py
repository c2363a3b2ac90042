"""Collective save and load of training checkpoints with Megatron's dist_checkpointing (torch_dist).

`save` writes the sharded state (model from keys.model_sharded_state_dict, plus optimizer, RNG,
loader state) at any TP/PP/EP/DP layout; `load` reads it back at any other. The metadata file
and the `latest` pointer are written only after every rank finished (format.py), so a crash
mid-save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from megatron_navil.checkpoint import integrity
from megatron_navil.checkpoint.compat import check_model_config
from megatron_navil.checkpoint.format import (
    FORMAT_VERSION,
    LATEST,
    METADATA,
    TOKENIZER_DIR,
    CheckpointError,
    complete_iterations,
    iteration_dir,
    read_latest,
    read_metadata,
    resolve,
)
from megatron_navil.checkpoint.keys import EXTRA_STATE, load_model_state, model_sharded_state_dict
from megatron_navil.checkpoint.optimizer_keys import (
    canonical_key,
    leaf_keys,
    match_stored_keys,
    request_leaves,
)
from megatron_navil.checkpoint.safe_load import weights_only_loads
from megatron_navil.checkpoint.tokenizer import copy_tokenizer, tokenizer_digest
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.errors import JobError
from megatron_navil.utils.cli import error_line
from megatron_navil.utils.distributed import barrier, is_rank0
from megatron_navil.utils.files import write_text_atomic
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class SaveFailed(JobError):
    """A checkpoint could not be written (disk full, I/O error). Exit 1: once the storage is
    fixed, the same command resumes from the previous checkpoint."""


def save(
    root: Union[str, Path],
    step: int,
    sharded_state: dict,
    model_cfg: NaViLModelConfig,
    extra_metadata: Optional[dict] = None,
    async_queue=None,
    on_complete: Optional[Callable[[Path], None]] = None,
    tokenizer: Optional[Union[str, Path]] = None,
) -> Path:
    """Write `sharded_state` (from model_sharded_state_dict, plus optimizer etc.) as step `step`.

    The metadata file and the `latest` pointer are written only once every rank has finished
    (after the background write completes when `async_queue` is given); `on_complete(dir)` runs
    then on rank 0 (pruning old checkpoints, the HF export). `tokenizer` (a directory or one of
    its files): copied into `iter_*/tokenizer/` before the metadata, its digest recorded, so
    the checkpoint carries the tokenizer it was trained with."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    d = iteration_dir(root, step)
    if is_rank0():
        stale = d / METADATA
        if stale.exists():  # overwriting a step: it is incomplete until the metadata returns
            stale.unlink()
        elif d.exists():  # the leftover of a killed or failed save: start it afresh
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
    barrier()
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": model_cfg.to_dict(),
        **(extra_metadata or {}),
    }
    if tokenizer is not None:
        meta["tokenizer_sha256"] = tokenizer_digest(tokenizer)

    def finalize():  # on every rank, once the files are written
        meta["files"] = integrity.record_digests(d)  # collective
        if is_rank0():
            if tokenizer is not None:
                copy_tokenizer(tokenizer, d / TOKENIZER_DIR)
            write_text_atomic(d / METADATA, json.dumps(meta, indent=2))
            write_text_atomic(Path(root) / LATEST, str(step))
            log.info("saved checkpoint %s", d)
            if on_complete is not None:
                on_complete(d)

    if async_queue is None:
        try:
            dist_checkpointing.save(sharded_state, str(d))
        except (Exception, CheckpointException) as e:  # a write failed: say where, keep the rest
            raise _write_failed(root, d, e) from e
        barrier()
        finalize()
        barrier()
    else:
        request = dist_checkpointing.save(sharded_state, str(d), async_sharded_save=True)
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return d


def _write_failed(root: Union[str, Path], d: Path, e: BaseException) -> SaveFailed:
    """The one-line error of a failed save. Rank 0 removes the partial directory; the `latest`
    pointer still names the previous complete checkpoint, which is untouched.

    NOTE: no collective here. Megatron's writer makes every rank raise together when a shard
    write fails; when only rank 0 fails (the metadata file), the others are left waiting and
    the launcher (torchrun) stops them once this rank exits."""
    why = _os_reason(e)
    if why is None and _disk_full(d):
        # torch.save's zip writer reports a failed write as a position mismatch, without errno
        why = "No space left on device"
    why = why or error_line(e)[:300]
    if is_rank0():
        shutil.rmtree(d, ignore_errors=True)
    latest = read_latest(root)
    kept = (
        f"the previous checkpoint (step {latest}) is intact"
        if latest is not None
        else "no earlier checkpoint exists"
    )
    return SaveFailed(
        f"cannot write checkpoint {d}: {why}; the partial directory was removed and {kept}; "
        "free space or fix the storage, then re-run the same command to resume"
    )


def _disk_full(d: Path, slack: int = 1 << 20) -> bool:
    """Is the file system holding `d` (nearly) full? Checked before the partial save is removed."""
    try:
        return shutil.disk_usage(d if d.exists() else d.parent).free < slack
    except OSError:
        return False


def _os_reason(e: BaseException) -> Optional[str]:
    """What the operating system said behind `e` ("No space left on device (path)"): an OSError
    in its cause/context chain or among the per-rank failures of a torch.distributed.checkpoint
    CheckpointException, or, once pickled across ranks or writer processes (which drops
    `__cause__`), an "[Errno N] ..." in their messages."""
    seen, stack, quoted = set(), [e], None
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return f"{x.strerror} ({x.filename})" if x.filename else x.strerror
        found = _ERRNO.search(str(x))
        quoted = quoted or (found.group(1).strip() if found else None)
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):  # rank -> exception, or (exception, traceback)
            for f in failures.values():
                parts = f if isinstance(f, tuple) else (f,)
                stack += [p for p in parts if isinstance(p, BaseException)]
    return quoted


_ERRNO = re.compile(r"\[Errno \d+\] ([^\n;]+)")


def _missing_keys_error(d: Path, keys: list[str]) -> CheckpointError:
    """A few lines: what is missing (model weights or optimizer state), how many, the first
    few, and the likely reason for that kind."""
    shown = "\n  ".join(keys[:5])
    more = f"\n  ... and {len(keys) - 5} more" if len(keys) > 5 else ""
    optimizer = sum(canonical_key(k).startswith("optimizer.") for k in keys)
    if optimizer == len(keys):
        what = f"optimizer state for {len(keys)} tensors this run trains"
        why = (
            "it was saved by a training stage that froze them (or with --finetune's fresh "
            "optimizer never saved): start this stage from it with --load ... --finetune"
        )
    else:
        what = f"{len(keys) - optimizer} model tensors (and {optimizer} optimizer tensors)"
        why = (
            "it was saved by a model of another structure (flavor, experts, model fields): "
            "use the matching config, or convert it with navil-convert"
        )
    return CheckpointError(f"cannot load {d}: the checkpoint lacks {what}:\n  {shown}{more}\n{why}")


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


def _stored_keys(d: Path) -> set[str]:
    """Every tensor/object key checkpoint `d` holds, from its metadata alone."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {sh.key for sh in load_sharded_metadata(str(d)).values()}


def load(
    path: Union[str, Path],
    sharded_state: dict,
    model_cfg: Optional[NaViLModelConfig] = None,
    optional: Optional[Callable[[str], bool]] = None,
    verify: bool = True,
) -> tuple[dict, dict]:
    """Load a checkpoint into the structure `sharded_state` describes (any parallel layout).

    Returns (loaded state dict, metadata). Request leaves stored under another spelling of the
    same tensor (optimizer_keys.match_stored_keys) are renamed first. Requested tensors the
    checkpoint lacks are refused before anything is read, on every rank, with one message naming
    how many and the first few, except:
    - `_extra_state` entries: Transformer Engine modules ask for their FP8 metadata, which
      checkpoints of the local backend and of navil-convert do not have (starting GPU training
      from a converted LLM or from a CPU checkpoint); those modules keep their fresh scaling
      state, as at initialisation;
    - keys for which `optional(key)` is true (the caller fills them in).
    Leaves left out for either reason are absent from the returned state.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    d = resolve(path)
    meta = read_metadata(d)
    if model_cfg is not None:
        check_model_config(meta["model"], model_cfg, d)
    if verify and "files" in meta:  # checksums recorded at save (checkpoints since 2026-12)
        try:
            integrity.verify_digests(d, meta["files"])
        except CheckpointError as e:
            raise CheckpointError(f"cannot load {d}: {e}{_earlier_hint(d)}") from None
    storage = integrity.read_storage_metadata(d)  # refuses a crafted pickle before Megatron
    integrity.check_files(d, storage)
    try:
        stored = _stored_keys(d)
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {d}: {e}") from e
    renamed = match_stored_keys(sharded_state, stored)
    if renamed:
        log.info("%s: %d optimizer tensors matched under their older key names", d, renamed)

    def is_leaf(x) -> bool:
        return isinstance(x, (ShardedBase, ShardedTensorFactory))

    def tolerated(key: str) -> bool:
        return key.endswith(EXTRA_STATE) or (optional is not None and optional(key))

    absent = {k for x in request_leaves(sharded_state) for k in leaf_keys(x) if k not in stored}
    missing = sorted(k for k in absent if not tolerated(k))
    if _agree_on_failure(len(missing)):
        if missing:
            raise _missing_keys_error(d, missing)
        raise CheckpointError(f"cannot load {d}: another rank is missing tensors (see its error)")
    if absent:
        _, sharded_state = extract_matching_values(
            sharded_state, lambda x: is_leaf(x) and all(k in absent for k in leaf_keys(x))
        )
        extra = sum(k.endswith(EXTRA_STATE) for k in absent)
        if extra:
            log.info(
                "%s has no Transformer Engine metadata (_extra_state) for %d modules (a "
                "local-backend or converted checkpoint): their FP8 scaling state starts fresh",
                d,
                extra,
            )
    try:
        with weights_only_loads():  # no pickle in the directory may name a callable
            state = dist_checkpointing.load(
                sharded_state, str(d), strict=StrictHandling.ASSUME_OK_UNEXPECTED
            )
    except (Exception, CheckpointException) as e:  # several types, one a BaseException
        raise _load_failed(d, storage, e) from e
    return state, meta


def _load_failed(d: Path, storage, e: BaseException) -> CheckpointError:
    """Name what is damaged (a stored tensor's file, common.pt) and the checkpoints that
    remain."""
    where = integrity.find_corrupt_item(d, storage)
    if where is None and not _loads(d / COMMON_FILE):
        where = str(d / COMMON_FILE)
    what = f"{where} is corrupt" if where else error_line(e)[:300]
    return CheckpointError(f"cannot load {d}: {what}{_earlier_hint(d)}")


def _earlier_hint(d: Path) -> str:
    """Where to go when checkpoint `d` is damaged: the newest complete ones before it."""
    earlier = [p for p in complete_iterations(d.parent) if p != d and p.name < d.name][-3:]
    if not earlier:
        return ""
    names = ", ".join(p.name for p in earlier)
    return f"; earlier complete checkpoints: {names} (resume from one with --load {earlier[-1]})"


COMMON_FILE = "common.pt"


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except FileNotFoundError:
        return True  # not this checkpoint's problem: Megatron names a missing file itself
    except Exception:
        return False


def load_model(
    path: Union[str, Path], chunks: list, model_cfg: Optional[NaViLModelConfig] = None
) -> dict:
    """Load model weights (only) into `chunks`; returns the checkpoint metadata."""
    state, meta = load(path, model_sharded_state_dict(chunks), model_cfg)
    load_model_state(state, chunks)
    return meta
