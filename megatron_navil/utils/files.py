"""Small file helpers shared by the trainer and the data tools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write `text` to `path` through a temporary name + fsync + rename: readers (and a crash)
    see either the old file or the whole new one, never half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
