"""Progress reporting for long conversions: a tqdm bar on a terminal, else periodic log lines.

Conversions run interactively (navil-convert) and inside training jobs (`--save-hf`), where
stderr is a log file: a bar there fills the log with carriage returns, so non-interactive runs
get one log line every `log_every_s` seconds with bytes done and the rate.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class ByteProgress:
    """Counts bytes written; `enabled=False` makes it silent (library calls, tests)."""

    def __init__(
        self,
        desc: str,
        total_bytes: int,
        enabled: bool = True,
        interactive: Optional[bool] = None,
        log_every_s: float = 30.0,
    ):
        self.desc, self.total, self.done = desc, total_bytes, 0
        self.enabled, self.log_every_s = enabled, log_every_s
        self.start = self._last = time.perf_counter()
        self._bar = None
        if enabled and (sys.stderr.isatty() if interactive is None else interactive):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.log_every_s:
            self._last = now
            log.info(
                "%s: %.2f / %.2f GB (%.0f%%), %.2f GB/s",
                self.desc,
                self.done / 1e9,
                self.total / 1e9,
                100.0 * self.done / max(self.total, 1),
                self.done / 1e9 / max(now - self.start, 1e-9),
            )

    def close(self) -> float:
        """Finish; returns the elapsed seconds."""
        if self._bar is not None:
            self._bar.close()
        return time.perf_counter() - self.start
