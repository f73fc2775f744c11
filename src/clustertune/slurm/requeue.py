"""slurm/train.sbatch's requeue step: the submitit job's requeue decision, for a batch script.

    python -m clustertune.slurm.requeue --max-requeues N   # after the launchers exited 75

Run by the batch script (on the job's first node) once the training step stopped with a
checkpoint: requeues the job with `scontrol requeue` when clustertune.slurm.job's
`requeue_decision` says so (the job still RUNNING, fewer than N requeues), and says why not
otherwise. Exit 0 when it did what the rule says, 1 at the requeue limit; the batch script
exits with the training step's own status either way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from clustertune.slurm.job import RequeueLimitReached, act_on_stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clustertune.slurm.requeue",
        description="After a stop with a checkpoint: requeue this SLURM job, or say why not.",
    )
    parser.add_argument(
        "--max-requeues", type=int, required=True, help="requeues allowed, SLURM's own included"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ
    try:
        act_on_stop(
            env["SLURM_JOB_ID"],
            restarts=int(env.get("SLURM_RESTART_COUNT") or 0),
            max_requeues=args.max_requeues,
            machine_rank=int(env.get("SLURM_NODEID") or 0),
            signals=None,  # the batch script saw them, not this process
        )
    except RequeueLimitReached as limit:
        print(f"clustertune: {limit}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # `scontrol requeue` makes SLURM send SIGTERM to the batch script and this process at
    # once; ignored here (as the script's own trap does), so the line saying what happened
    # is still written. SLURM's SIGKILL after KillWait ends this in any case.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(main())
