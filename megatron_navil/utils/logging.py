"""Rank-aware logging: library code logs through this instead of print().

By default only global rank 0 emits INFO records (so an 8-node job prints one line, not 64);
WARNING and above are emitted by every rank with a `[rank N]` prefix because a warning on one
rank is usually the one that matters. `NAVIL_LOG_ALL_RANKS=1` makes every rank log everything.
"""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def global_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else the launcher env.

    Looks torch up in sys.modules instead of importing it: a light CLI (data_tools) must not pay
    torch's import time just to log a line."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_prefix = f"[rank {rank}] " if rank != 0 else ""
        if os.environ.get("NAVIL_LOG_ALL_RANKS") == "1":
            return True
        return rank == 0 or record.levelno >= logging.WARNING


def _configure() -> None:
    global _CONFIGURED
    if _CONFIGURED:
        return
    root = logging.getLogger("navil")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(rank_prefix)s%(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    handler.addFilter(_RankFilter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("NAVIL_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """A logger under the `navil` namespace, e.g. get_logger(__name__)."""
    _configure()
    short = name.split(".", 1)[1] if name.startswith("megatron_navil.") else name
    return logging.getLogger(f"navil.{short}")
