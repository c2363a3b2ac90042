"""The one exception type conversion raises for problems a user can fix."""

from __future__ import annotations

from megatron_navil.errors import UserError


class ConversionError(UserError, ValueError):
    """A conversion input/output problem the user can fix (missing file, truncated shard, key or
    shape mismatch, existing output). The message names the file or key and what to do; the
    navil-convert CLI prints it as one line and exits with status 2."""
