"""The one atomic writer of the package and its tools.

Everything a reader or a restarted job may open while it is being written (checkpoint pointers
and metadata, dataset manifests and reports, tokenizer files, reports of the tools) goes through
`atomic_writer`: a temporary name beside the target, fsync, rename. A crash or a full disk leaves
either the old file or the whole new one, never half of it, and no temporary behind. Directories
written as a whole (a checkpoint, an HF export) are staged and renamed instead
(checkpoint/io.py, conversion/outputs.staged).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator, Literal, Optional, Union


@contextlib.contextmanager
def atomic_writer(path: Union[str, Path], mode: Literal["w", "wb"] = "w") -> Iterator[IO]:
    """A file object whose contents replace `path` only when the block ends without an error;
    on an error the temporary is removed and `path` is untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: Union[str, Path], obj: Any, *, indent: Optional[int] = None) -> None:
    """Write `obj` as JSON (one trailing newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
