"""Shared CLI plumbing of the data tools: their usage error, progress, atomic JSON writes.

Every `navil-*` data tool wraps its `main` in megatron_navil.utils.cli.run_cli, as every other
console script does, so an error the user can fix (bad path, bad flag combination, output made
with other settings) prints one line naming the thing and what to do, and exits 2 without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional, Sequence

from megatron_navil.errors import UserError
from megatron_navil.utils.files import write_text_atomic
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)


class UsageError(UserError):
    """A data tool's flag, path or flag combination that cannot work (exit 2)."""


def write_json_atomic(path: str, obj: Any, *, indent: Optional[int] = None) -> None:
    """Write JSON to `path` via a temporary name + rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_text(text: str) -> None:
    """Write a CLI's final report to stdout (the one place data tools write to stdout)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width text table (one screen; no dependency)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Progress:
    """tqdm bar when stderr is a terminal, else a log line every `log_every_s` seconds.

    Batch jobs under SLURM have no terminal: a bar there fills log files with carriage returns,
    so they get a periodic line with counts and rates instead.
    """

    def __init__(
        self,
        desc: str,
        total: Optional[int] = None,
        log_every_s: float = 30.0,
        interactive: Optional[bool] = None,
    ):
        self.desc, self.total, self.log_every_s = desc, total, log_every_s
        self.count = 0
        self.extra: dict[str, Any] = {}
        self.start = self._last = time.monotonic()
        if interactive is None:
            interactive = sys.stderr.isatty()
        self._bar = None
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)

    def update(self, n: int = 1, **extra: Any) -> None:
        self.count += n
        self.extra.update(extra)
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix(self.extra, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.log_every_s:
            self._last = now
            logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = f"{self.count}" + (f"/{self.total}" if self.total else "")
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        rate = self.count / elapsed
        return f"{self.desc}: {done} samples, {rate:.1f}/s, {elapsed:.0f}s {extra}".rstrip()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
