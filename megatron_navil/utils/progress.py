"""Progress of long jobs: a tqdm bar on a terminal, else a log line every `log_every_s` seconds.

Conversions and preprocessing run interactively and inside batch jobs (SLURM, `--save-hf` of a
training run) whose stderr is a log file: a bar there fills the log with carriage returns, so a
non-interactive run gets one line per period with the count, the rate and any extra fields.
The one helper for every long loop of the package and its tools.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal, Optional

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class Progress:
    """Counts work done (`unit` "sample": items, "B": bytes, shown in GB); `enabled=False`
    makes it silent (library calls, tests)."""

    def __init__(
        self,
        desc: str,
        total: Optional[int] = None,
        unit: Literal["sample", "B"] = "sample",
        enabled: bool = True,
        interactive: Optional[bool] = None,
        log_every_s: float = 30.0,
    ):
        self.desc, self.total, self.unit, self.count = desc, total, unit, 0
        self.enabled, self.log_every_s = enabled, log_every_s
        self.extra: dict[str, Any] = {}
        self.start = self._last = time.monotonic()
        self._bar = None
        if enabled and (sys.stderr.isatty() if interactive is None else interactive):
            from tqdm import tqdm

            scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
            self._bar = tqdm(
                total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **scaled
            )

    def update(self, n: int = 1, **extra: Any) -> None:
        """Add `n` units done; `extra` fields (e.g. written=4) are shown with the count."""
        self.count += n
        self.extra.update(extra)
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix(self.extra, refresh=False)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= self.log_every_s:
            self._last = now
            log.info("%s", self.line())

    def line(self) -> str:
        """The periodic log line: count (of total), rate, elapsed seconds, extra fields."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        if self.unit == "B":
            of = f" / {self.total / 1e9:.2f}" if self.total else ""
            pct = f" ({100.0 * self.count / self.total:.0f}%)" if self.total else ""
            rate = self.count / 1e9 / elapsed
            text = f"{self.desc}: {self.count / 1e9:.2f}{of} GB{pct}, {rate:.2f} GB/s"
        else:
            done = f"{self.count}" + (f"/{self.total}" if self.total else "")
            text = f"{self.desc}: {done} samples, {self.count / elapsed:.1f}/s"
        return f"{text}, {elapsed:.0f}s {extra}".rstrip()

    def close(self) -> float:
        """Finish; returns the elapsed seconds."""
        if self._bar is not None:
            self._bar.close()
        return time.monotonic() - self.start
