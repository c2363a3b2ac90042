"""The on-disk layout of a checkpoint root: the `latest` pointer, iteration directories, metadata.

    <root>/latest_checkpointed_iteration.txt   step of the newest COMPLETE checkpoint
    <root>/iter_0000100/navil_checkpoint.json  step, resolved model config, saved layout
    <root>/iter_0000100/tokenizer/             the tokenizer the run trains with
    <root>/hf_iter_0000100/                    its `--save-hf` copy, when asked for
An iteration directory counts as complete once its metadata file exists (written last), and the
pointer only ever names complete ones. File logic only: no torch, no collective.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from megatron_navil.errors import UserError
from megatron_navil.utils.distributed import is_rank0

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "navil_checkpoint.json"
TOKENIZER_DIR = "tokenizer"
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
    p = resolve(path) / METADATA
    try:
        with open(p) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is damaged ({e}); the checkpoint is corrupt") from None


def complete_iterations(root: Union[str, Path]) -> list[Path]:
    """The complete iter_* directories under `root`, oldest first."""
    return sorted(p for p in Path(root).glob("iter_*") if (p / METADATA).exists())


def hf_export_dir(iteration: Path) -> Path:
    """Where `--save-hf` writes the HF copy of checkpoint directory `iteration`."""
    return iteration.parent / f"hf_{iteration.name}"


def prune(root: Union[str, Path], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never the latest one), and
    their `--save-hf` copies. Rank 0 deletes; the other ranks return []."""
    if keep_last <= 0 or not is_rank0():
        return []
    complete = complete_iterations(root)
    latest = read_latest(root)
    removed = []
    for p in complete[:-keep_last]:
        if latest is not None and p == iteration_dir(root, latest):
            continue
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(hf_export_dir(p), ignore_errors=True)
        removed.append(p)
    return removed
