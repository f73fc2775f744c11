"""Graceful stop: a signal sets a flag; ranks agree on it at the next step boundary.

SLURM sends SIGUSR1 (or what --signal names; submitit uses SIGUSR2) before a time limit,
and SIGTERM on preemption. A handler only sets a flag, because a ZeRO checkpoint needs
every rank: the trainer all-reduces the flag with its per-step statistics, so all ranks
see the stop at the same step, save together, and exit with EXIT_REQUEUE.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# The launcher wrapper (clustertune.launch) reads this file to tell "stopped, checkpoint
# saved, requeue" apart from a crash: torchrun reports both as a failed worker.
STATUS_FILE_ENV = "CLUSTERTUNE_STATUS_FILE"


class StopFlag:
    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        # Repeats are ignored on purpose: under SLURM one stop reaches a worker 2-3 times
        # (from SLURM, clustertune-launch and torchrun), and the save must not be cut short.
        if self.received is None:
            self.received = signum

    @property
    def is_set(self) -> bool:
        return self.received is not None


def write_status(status: str) -> None:
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        Path(path).write_text(status + "\n")


class StopForRequeue(Exception):
    """Raised after the stop checkpoint is saved; the recipe exits with EXIT_REQUEUE."""

    def __init__(self, step: int, signum: int | None) -> None:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint saved, resume with the same command"
        )
        self.step = step
