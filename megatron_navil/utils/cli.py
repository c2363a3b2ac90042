"""`run_cli`: the one way every `navil-*` console script turns errors into exit statuses.

- `UserError` (and subclasses): `error: <message>` as ONE line on stderr (a multi-line message is
  joined with "; ": log scrapers and people both read the first line), exit status 2. In a
  multi-rank job an error every rank shares is printed by rank 0 only; one rank's own error is
  prefixed with its rank.
- `JobError`: the same line, exit status 1 (the job can be resumed with the same command).
- Ctrl-C: one line saying what happened to the outputs, exit status 130.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from megatron_navil.errors import JobError, UserError
from megatron_navil.utils.logging import global_rank

Argv = Optional[Sequence[str]]


def error_line(e: BaseException) -> str:
    """The message of `e` as one line (its non-blank lines joined with "; ")."""
    parts = [x.strip() for x in str(e).splitlines() if x.strip()]
    return "; ".join(parts) or type(e).__name__


def report(e: BaseException) -> None:
    """Write `e` as one `error:` line on stderr, rank-aware (see the module docstring)."""
    rank = global_rank()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if getattr(e, "same_on_every_rank", False) and rank != 0:
        return
    prefix = f"[rank {rank}] " if multi and not getattr(e, "same_on_every_rank", False) else ""
    sys.stderr.write(f"{prefix}error: {error_line(e)}\n")
    sys.stderr.flush()


def run_cli(
    body: Callable[[Argv], int],
    argv: Argv = None,
    *,
    interrupted: str = "interrupted; re-run the same command to resume",
    cleanup: Optional[Callable[[], None]] = None,
) -> int:
    """Run a console script's body and return its exit status (see the module docstring).
    `cleanup` runs whatever happened (e.g. tearing down a process group)."""
    try:
        return body(argv)
    except (UserError, JobError) as e:
        report(e)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(interrupted + "\n")
        return 130
    finally:
        if cleanup is not None:
            cleanup()
