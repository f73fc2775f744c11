"""The submitit job (`LaunchJob`: one task per node) and the requeue decision after a stop.

Each of the job's N tasks computes its node's launch arguments from SLURM's variables
(clustertune.slurm.env) and runs clustertune-launch (clustertune.slurm.node builds the
command). Stopping and requeueing, as verified on the local dev cluster (slurm/dev-cluster,
Slurm 22.05):
- SLURM signals a job step as a whole: `--signal=USR2@T` (what submitit asks for), `scancel
  -s USR2` and the SIGTERM of a cancel, requeue or preemption reach every process of the step,
  torchrun and the workers included, whatever session they run in. torchrun dies on USR1/USR2
  (it handles only TERM/INT/HUP/QUIT), so the task starts clustertune-launch with USR1/USR2
  ignored; torchrun inherits that, while clustertune-launch and the workers install their own
  handlers. The task also forwards every stop signal to clustertune-launch itself.
- All ranks stop at the same step boundary and save together, so every node's launcher exits
  75 (EXIT_REQUEUE). submitit's own handler would call checkpoint() on rank 0 as soon as the
  signal arrives, before anything is saved, and then exit; the task replaces it while its
  launcher runs, and requeues only after node 0's launcher reports the checkpoint complete.
- Node 0 then requeues (`scontrol requeue`) only if SLURM still has the job RUNNING (a warning
  signal, or a stop the workers decided on). A job that SLURM itself is ending is COMPLETING:
  a requeue or preemption is requeued already, and a cancelled job must stay cancelled
  (`scontrol requeue` would revive it). max_requeues counts SLURM_RESTART_COUNT, requeues by
  SLURM included; at the limit the task fails with a message saying how to continue.
  `requeue_decision` is that rule; slurm/train.sbatch applies it too (clustertune.slurm.requeue).
- The requeued job reruns the same command: `resume: auto` continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from clustertune.slurm.env import NodeLaunch, launch_args_from_env
from clustertune.slurm.node import node_command
from clustertune.stop import EXIT_OK, EXIT_REQUEUE, EXIT_USER_ERROR, STOP_SIGNALS, launcher_preexec

# Only this node asks SLURM about the job and requeues it; the others just stop.
DECIDING_RANK = 0


def log(message: str) -> None:
    """One timestamped line on stderr (the task's log): `clustertune-submit [stamp] message`."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    print(f"clustertune-submit [{stamp}] {message}", file=sys.stderr, flush=True)


def job_fields(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); None once purged."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0 or "JobState=" not in shown.stdout:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout.splitlines()[0]))


@dataclass(frozen=True)
class RequeueDecision:
    """What a node does after its launcher saved a checkpoint and exited 75."""

    action: Literal["requeue", "leave_to_node_0", "let_slurm_end_it", "stop_at_limit"]
    reason: str  # completes "checkpoint saved and stopped (...)" in the log


def requeue_decision(
    job_state: str | None, restarts: int, max_requeues: int, machine_rank: int, job_id: str
) -> RequeueDecision:
    """The requeue rule after a stop with a checkpoint (see the module docstring).

    job_state is SLURM's JobState, looked up by the deciding node only (None elsewhere: N-1
    nodes asking slurmctld at once would learn nothing they act on). restarts is
    SLURM_RESTART_COUNT, so requeues by SLURM itself count against max_requeues.
    """
    if machine_rank != DECIDING_RANK:
        return RequeueDecision("leave_to_node_0", "node 0 decides about the requeue")
    if job_state != "RUNNING":
        return RequeueDecision(
            "let_slurm_end_it",
            f"SLURM is ending the job ({job_state}: requeued, preempted, cancelled or out of "
            "time), so it is not requeued from here. A cancelled job continues from the "
            "checkpoint when the same command is submitted again.",
        )
    if restarts >= max_requeues:
        return RequeueDecision(
            "stop_at_limit",
            f"but job {job_id} was requeued {restarts} times already (max_requeues="
            f"{max_requeues}); submit the same command again to continue from the checkpoint.",
        )
    return RequeueDecision(
        "requeue",
        f"requeued job {job_id} (requeue {restarts + 1} of at most {max_requeues}); it resumes "
        "from the checkpoint",
    )


class RequeueLimitReached(RuntimeError):
    """The workers saved a checkpoint and stopped, and the job may not be requeued again."""


def act_on_stop(
    job_id: str, restarts: int, max_requeues: int, machine_rank: int, signals: str | None
) -> RequeueDecision:
    """Decide (asking SLURM for the job's state on node 0 only), requeue if so, log it.

    signals names the stop signals this process saw, for the log; None where it cannot know
    (the batch script of slurm/train.sbatch). Raises RequeueLimitReached at the limit.
    """
    state = None
    if machine_rank == DECIDING_RANK:
        state = (job_fields(job_id) or {}).get("JobState", "UNKNOWN")
    decision = requeue_decision(state, restarts, max_requeues, machine_rank, job_id)
    stopped = "checkpoint saved and stopped" + (f" ({signals})" if signals else "")
    if decision.action == "stop_at_limit":
        raise RequeueLimitReached(f"{stopped}, {decision.reason}")
    if decision.action == "requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    log(f"{stopped}; {decision.reason}")
    return decision


class LaunchFailed(RuntimeError):
    """clustertune-launch exited with an error on this node."""


@dataclass(frozen=True)
class LaunchJob:
    """One SLURM task per node: this node's `clustertune-launch` (the submitit callable).

    submitit runs `__call__` on every node; `checkpoint()` says what to run after a requeue.
    """

    launch_config: str  # absolute path of the accelerate launch file
    processes_per_node: int
    recipe_argv: tuple[str, ...]  # recipe script and its arguments, relative to workdir
    workdir: str
    max_requeues: int
    is_deepspeed: bool = False

    def command(self, node: NodeLaunch) -> list[str]:
        return node_command(
            node, self.launch_config, self.recipe_argv, is_deepspeed=self.is_deepspeed
        )

    def __call__(self) -> dict[str, Any]:
        env = os.environ
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        node = launch_args_from_env(env, self.processes_per_node)
        command = self.command(node)
        where = (
            f"node {env.get('SLURMD_NODENAME', '?')} "
            f"(machine_rank {node.machine_rank} of {node.num_machines})"
        )
        log(
            f"job {env.get('SLURM_JOB_ID')} run {restarts + 1} (requeued {restarts} of at most "
            f"{self.max_requeues} times) on {where}: {shlex.join(command)}"
        )
        code, received = self._run_forwarding_signals(command)
        if code == EXIT_OK:
            log(f"finished on {where}")
            return {"node": node.machine_rank, "requeues": restarts}
        if code == EXIT_REQUEUE:
            self._after_stop(node.machine_rank, restarts, received)
        what = (
            "the recipe refused its input (the line above says why)"
            if code == EXIT_USER_ERROR
            else "see the log above"
        )
        raise LaunchFailed(f"clustertune-launch exited with {code} on {where}: {what}.")

    def checkpoint(self) -> Any:
        """submitit's hook: what to run after a requeue. The same job: every rank wrote its part
        of the checkpoint and `resume: auto` continues from it. submitit calls this only if its
        handler sees the signal before __call__ takes over (before any training started)."""
        import submitit  # loaded already: submitit is what runs this job

        return submitit.helpers.DelayedSubmission(self)

    def _run_forwarding_signals(self, command: list[str]) -> tuple[int, list[int]]:
        received: list[int] = []
        child: subprocess.Popen | None = None

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            log(f"got {signal.Signals(signum).name}; forwarded to clustertune-launch")
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

        # Replaces submitit's handlers (see the module docstring): all nodes must forward,
        # and the requeue waits until the checkpoint is complete.
        for sig in STOP_SIGNALS:
            signal.signal(sig, forward)
        child = subprocess.Popen(command, cwd=self.workdir, preexec_fn=launcher_preexec)
        return child.wait(), received

    def _after_stop(self, machine_rank: int, restarts: int, received: list[int]) -> None:
        """The workers saved a checkpoint and stopped: requeue or not; never returns."""
        signals = ", ".join(signal.Signals(s).name for s in received) or "no signal to this task"
        act_on_stop(os.environ["SLURM_JOB_ID"], restarts, self.max_requeues, machine_rank, signals)
        raise SystemExit(EXIT_REQUEUE)  # no result file: the job is not finished
