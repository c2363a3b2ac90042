"""Outputs appear complete or not at all: written under a hidden sibling, renamed at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_navil.conversion.errors import ConversionError


def check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConversionError(f"output {path} already exists; choose another path or remove it")


@contextlib.contextmanager
def staged(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `final`; on success it replaces `final` by rename
    (same filesystem, so the rename is atomic); on any error it is removed."""
    final = Path(final)
    check_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # overwrite: move the old one aside first, drop it after the rename
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: {what}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} should hold a JSON object; {what}")
    return data
