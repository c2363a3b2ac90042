"""Shared CLI plumbing of the data tools: their usage error, progress, atomic JSON writes.

Every `navil-*` data tool wraps its `main` in megatron_navil.utils.cli.run_cli, as every other
console script does, so an error the user can fix (bad path, bad flag combination, output made
with other settings) prints one line naming the thing and what to do, and exits 2 without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from megatron_navil.errors import UserError
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)


class UsageError(UserError):
    """A data tool's flag, path or flag combination that cannot work (exit 2)."""


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
