"""Pre-emption handling: SIGTERM / SIGUSR1 (what SLURM sends before killing a job) request a
checkpoint after the current step, agreed on by all ranks (any rank's signal counts)."""

from __future__ import annotations

import signal

from megatron_navil.utils.distributed import any_rank
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class ExitSignalHandler:
    """Records SIGTERM / SIGUSR1 (SLURM pre-emption) instead of dying, so the trainer can save a
    checkpoint at the next step boundary and exit 0; `restore` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {}

    def install(self) -> "ExitSignalHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning(
                "received %s: saving a checkpoint after this step, then exiting",
                signal.Signals(signum).name,
            )
        self.received = signum

    def should_exit(self) -> bool:
        """Collective: True on every rank if any rank got a signal."""
        return any_rank(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
