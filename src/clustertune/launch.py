"""`clustertune-launch`: `accelerate launch` with signals that reach the training processes.

    clustertune-launch --config_file launch/zero2.yaml --num_processes 2 recipes/finetune.py --config ...

Why a wrapper (the stop protocol itself is in clustertune.stop):
- torchrun (inside accelerate launch) forwards only SIGINT/TERM/HUP/QUIT to its workers, and
  SIGUSR1/USR2 (what SLURM and submitit send before a time limit) kill the launcher itself,
  leaving the workers orphaned; it starts workers in new sessions, so a signal to the
  launcher's process group never reaches them either.
- After a forwarded SIGTERM torchrun kills workers that have not exited within 30 s, which
  can cut a checkpoint short.
So this wrapper runs accelerate launch in its own session and sends each stop signal
(TERM, INT, USR1, USR2, HUP) straight to the workers (the launcher's children), which save
a checkpoint together and exit. torchrun reports that as a failed worker; the workers'
status file tells the wrapper it was a clean stop, and it exits with EXIT_REQUEUE (75).
If the wrapper itself dies, PR_SET_PDEATHSIG sends the launcher SIGTERM, which torchrun
forwards, so no worker is left running unobserved.

After a user error the workers' one line is the whole story: torchrun's failure report
(ChildFailedError traceback, "failed (exitcode: 2)") only repeats it as a crash. The launcher
process is therefore accelerate launch run in-process by `launcher_main`, which drops that
report once the status file says "user_error" and passes everything else through untouched
(its output is not piped, so a normal run's output stays live).

A worker that dies otherwise (killed by a signal, or exiting non-zero) is reported in one line
instead of that traceback (`dead_worker_line`): its rank, host, signal or exit code, and the
checkpoint rerunning the same command resumes from (the trainer records its run folder beside
the status file). The launcher's exit code stays what it was (1).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from clustertune.stop import (
    EXIT_REQUEUE,
    EXIT_USER_ERROR,
    STATUS_FILE_ENV,
    STATUS_REQUEUE,
    STATUS_USER_ERROR,
    STOP_SIGNALS,
    launcher_preexec,
    read_status,
    recorded_run_folder,
)

# What torchrun logs when a worker fails; dead_worker_line says it in one line instead.
TORCHRUN_FAILURE_RECORD = "failed (exitcode"
EXIT_CRASH = 1  # the launcher's code after a failed worker (an uncaught ChildFailedError)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    result, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        result += kids
        frontier = kids
    return result


def run(accelerate_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="clustertune-launch-") as scratch:
        status_file = Path(scratch) / "status"
        env = dict(os.environ, **{STATUS_FILE_ENV: str(status_file)})
        command = [sys.executable, "-c", LAUNCHER_MAIN, *accelerate_args]
        launcher = subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=launcher_preexec
        )

        def forward(signum: int, frame: object) -> None:
            # The launcher's direct children are the workers (torchrun's, or the single
            # process of a one-process launch). Signalling the launcher itself would kill it.
            workers = children(launcher.pid)
            for pid in workers or [launcher.pid]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        for sig in STOP_SIGNALS:
            signal.signal(sig, forward)
        code = launcher.wait()
        status = read_status(status_file)
        if status == STATUS_USER_ERROR:  # torchrun reports every failed worker as 1; keep the 2
            return EXIT_USER_ERROR
        if status == STATUS_REQUEUE:
            print(
                f"clustertune-launch: workers saved a checkpoint and stopped; exit {EXIT_REQUEUE} (requeue)",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_REQUEUE
        return code if code >= 0 else 128 - code


# The launcher process: `python -m accelerate.commands.launch ARGS`, through launcher_main.
LAUNCHER_MAIN = "from clustertune.launch import launcher_main; launcher_main()"


class DropFailureReports(logging.Filter):
    """Drop torchrun's records once a worker has reported a user error in the status file
    (workers write the status before they exit, so it is there when torchrun logs the exit),
    and its report of a failed worker, which dead_worker_line replaces."""

    def __init__(self, status_file: Path) -> None:
        super().__init__()
        self.status_file = status_file

    def filter(self, record: logging.LogRecord) -> bool:
        if TORCHRUN_FAILURE_RECORD in record.getMessage():
            return False
        return read_status(self.status_file) != STATUS_USER_ERROR


def _first_failure(error: BaseException) -> tuple[int, int] | None:
    """(global rank, exit code: negative for a signal) of the worker that failed first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, ChildFailedError):
        rank, failure = error.get_first_failure()
        return rank, failure.exitcode
    if isinstance(error, subprocess.CalledProcessError):  # a one-process launch
        return 0, error.returncode
    return None


def dead_worker_line(error: BaseException, status_file: Path) -> str | None:
    """One line for a worker that died: which rank, on which host, how, and what a rerun
    continues from. None for an error that is not a worker's death."""
    from clustertune.run_folder import RunFolder

    failure = _first_failure(error)
    if failure is None:
        return None
    rank, code = failure
    how = (
        f"was killed by {signal.Signals(-code).name}"
        if code < 0 and -code in signal.valid_signals()
        else f"exited with code {code}"
    )
    run = recorded_run_folder(status_file)
    if run is None:
        rerun = "rerun the same command to start it again"
    else:
        latest = RunFolder(run).latest_complete()
        rerun = (
            f"rerunning the same command resumes from {latest}"
            if latest is not None
            else f"no checkpoint of {run} was saved yet, so rerunning the same command starts "
            "from step 0"
        )
    return (
        f"clustertune-launch: rank {rank} on {socket.gethostname()} {how}, and the job stopped; "
        f"{rerun}."
    )


def launcher_main() -> None:
    """`accelerate launch` (sys.argv[1:]) in this process, without torchrun's failure report
    after a user error; any other failure is reported exactly as accelerate launch does."""
    import clustertune.quiet  # noqa: F401  (before accelerate imports DeepSpeed)

    status_file = Path(os.environ[STATUS_FILE_ENV])
    import torch.distributed.run  # noqa: F401  (creates torchrun's loggers)
    from accelerate.commands.launch import launch_command, launch_command_parser

    # torchrun logs through one logger per module (torch.distributed.elastic.*, .launcher.*,
    # .run); a logger filter applies to its own records only, so each gets one.
    drop = DropFailureReports(status_file)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).addFilter(drop)
    try:
        launch_command(launch_command_parser().parse_args())
    except Exception as error:
        # ChildFailedError (torchrun) or CalledProcessError (a one-process launch): after a
        # user error the worker has printed the line; run() turns the status into exit 2.
        if read_status(status_file) == STATUS_USER_ERROR:
            sys.exit(EXIT_USER_ERROR)
        line = dead_worker_line(error, status_file)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        sys.exit(EXIT_CRASH)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
