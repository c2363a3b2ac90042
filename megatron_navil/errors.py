"""The error types every console script reports the same way (`megatron_navil.utils.cli.run_cli`).

`UserError` is the base of every problem caused by something the user controls: a flag, a config,
a path, a checkpoint, a tokenizer, a data directory. Each package raises its own subclass
(ConfigError, CheckpointError, ConversionError, TokenizerError, DataError, ...), so a library
caller can catch one kind, and a console script catches them all with `except UserError`. The
message names the thing and what to do. Anything else is a bug and keeps its traceback.

`JobError` is a job stopped for an outside reason (a worker killed, a signal): exit 1, and the
same command resumes it.

This module imports nothing of the package: every layer may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; console scripts print its message as one line, exit status 2.

    `same_on_every_rank=True` says the error follows from what all ranks share (the command
    line, the world size, a file every rank reads), so a multi-rank job reports it once, from
    rank 0, instead of once per rank."""

    exit_code = 2

    def __init__(self, message: str = "", same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


class JobError(Exception):
    """The job stopped for an outside reason (e.g. a worker was killed); exit 1, resumable."""

    exit_code = 1
