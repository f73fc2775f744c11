"""The stop/requeue protocol, in one place: signals, the status file, exit codes, preexec.

How a stop travels (SLURM's warning before a time limit, a preemption, Ctrl-C):

1. SLURM sends SIGUSR1 (or what --signal names; submitit uses SIGUSR2) before a time limit,
   and SIGTERM on preemption. `clustertune-launch` (clustertune.launch) and the SLURM task
   (clustertune.slurm) forward every one of STOP_SIGNALS to the training processes.
2. A worker's handler (StopFlag) only sets a flag: a ZeRO checkpoint needs every rank, so the
   trainer all-reduces the flag with its per-step statistics, all ranks see the stop at the
   same step, save together, and raise StopForRequeue.
3. The worker writes "requeue" into the status file named by STATUS_FILE_ENV (set by
   clustertune-launch) and exits 0, because torchrun would report any other code as a crash;
   without a launcher it exits EXIT_REQUEUE itself (`exit_code_after_stop`).
4. clustertune-launch reads the status file and exits EXIT_REQUEUE (75, EX_TEMPFAIL) after a
   clean stop, EXIT_USER_ERROR (2) after a refused input, and the launcher's code otherwise.
   The SLURM task (or slurm/train.sbatch) then decides whether to requeue.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

# Exit codes a scheduler wrapper can act on (documented in README "Exit codes").
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad config or input: fix it, do not requeue
EXIT_REQUEUE = 75  # stopped on a signal after saving a checkpoint (EX_TEMPFAIL): requeue me

# What stops a run gracefully; the launchers forward exactly these to the workers.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

# The launcher wrapper reads this file to tell "stopped, checkpoint saved, requeue" and "bad
# input" apart from a crash: torchrun reports all three as a failed worker.
STATUS_FILE_ENV = "CLUSTERTUNE_STATUS_FILE"
STATUS_REQUEUE = "requeue"
STATUS_USER_ERROR = "user_error"


class StopFlag:
    """Set by the first stop signal; the trainer reads it at each step boundary."""

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


class StopForRequeue(Exception):
    """Raised after the stop checkpoint is saved; the recipe exits with exit_code_after_stop()."""

    def __init__(self, step: int, signum: int | None) -> None:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint saved, resume with the same command"
        )
        self.step = step


def write_status(status: str) -> None:
    """Tell clustertune-launch how this worker ended (no-op without a launcher)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        Path(path).write_text(status + "\n")


def read_status(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def _run_folder_file(status_file: str | Path) -> Path:
    return Path(f"{status_file}.run_folder")


def record_run_folder(output_dir: Path) -> None:
    """Tell clustertune-launch which run folder the workers write, so that after a crash it
    can name the checkpoint a rerun resumes from (global rank 0; no-op without a launcher)."""
    status_file = os.environ.get(STATUS_FILE_ENV)
    if status_file and os.environ.get("RANK", "0") == "0":
        _run_folder_file(status_file).write_text(str(Path(output_dir).resolve()))


def recorded_run_folder(status_file: Path) -> Path | None:
    path = _run_folder_file(status_file)
    return Path(path.read_text().strip()) if path.is_file() else None


def exit_code_after_stop() -> int:
    """The worker's exit code once the stop checkpoint is saved. Under clustertune-launch the
    status file carries the verdict and the wrapper exits 75; exiting 0 keeps torchrun from
    reporting a stop as a crash. A plain `python recipe.py` exits 75 itself."""
    write_status(STATUS_REQUEUE)
    return EXIT_OK if os.environ.get(STATUS_FILE_ENV) else EXIT_REQUEUE


def launcher_preexec() -> None:
    """In the child, before exec of the launcher (accelerate launch / clustertune-launch):
    - PR_SET_PDEATHSIG: die with the parent, so no worker is left running unobserved;
    - SLURM signals every process of a job step, torchrun included, and USR1/USR2 would kill
      it; ignored here (inherited), while the launcher and the workers install their own
      handlers for them."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
