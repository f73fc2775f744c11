"""The prepare stage of a submission (`clustertune-submit --prepare-shards N`): a SLURM array of
N CPU-only tasks before the training job, task i running

    python -m clustertune.data_cli prepare --config CFG [the recipe's overrides] --shard i/N

(`clustertune-data prepare`) with the training recipe's own arguments, so the tasks and the
training resolve the same data.prepared_dir (the default is keyed by the data's fingerprint
under $CLUSTERTUNE_CACHE: the tasks get the training's environment, the settings' env and
setup lines included). The training waits on the whole array (afterok) and then reads the
prepared shards memory-mapped, tokenising nothing.

A task that does not finish: every shard is written whole or not at all
(clustertune.prepare.store), so a rerun keeps the finished shards and makes the interrupted
one again.
- Preempted, or its node failed: SLURM requeues the task (the jobs are submitted with
  --requeue) and the rerun runs the same command.
- Warned of its time limit (USR2, signal_delay_s before it): the command dies with the signal,
  submitit calls `PrepareJob.checkpoint()` and requeues the task with a fresh time limit, at
  most max_requeues times.
- Cancelled, failed, or out of requeues: the array cannot complete, so SLURM cancels the
  training (afterok with kill-on-invalid-dep) and the evaluation after it. Submitting the same
  command again prepares only the missing shards; a task whose shards all exist ends at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.errors import UserError
from clustertune.slurm.job import log
from clustertune.stop import EXIT_OK, EXIT_USER_ERROR

TRAINING_RECIPE = "finetune.py"  # the recipe whose data a prepare array prepares


class PrepareFailed(RuntimeError):
    """`clustertune-data prepare` exited with an error in an array task."""


@dataclass(frozen=True)
class PrepareJob:
    """One task of the prepare array: `--shard shard/count`, 0-based as the flag is (the
    submitit callable)."""

    config_argv: tuple[str, ...]  # the training recipe's arguments: --config CFG, overrides
    shard: int
    count: int
    num_proc: int | None  # tokenising processes (the task's CPUs); None: data.num_proc
    workdir: str

    def command(self, shard: str | None = None) -> list[str]:
        """The task's command; `shard` replaces its index (the dry run's placeholder)."""
        return [
            sys.executable,
            "-m",
            "clustertune.data_cli",
            "prepare",
            *self.config_argv,
            "--shard",
            f"{self.shard if shard is None else shard}/{self.count}",
            *(("--num_proc", str(self.num_proc)) if self.num_proc else ()),
        ]

    def __call__(self) -> dict[str, Any]:
        env = os.environ
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        task = f"{env.get('SLURM_ARRAY_JOB_ID', env.get('SLURM_JOB_ID'))}_{self.shard}"
        command = self.command()
        log(
            f"prepare task {task} run {restarts + 1} on node {env.get('SLURMD_NODENAME', '?')}: "
            f"shard {self.shard + 1} of {self.count}: {shlex.join(command)}"
        )
        code = subprocess.call(command, cwd=self.workdir)
        if code == EXIT_OK:
            log(f"prepare task {task} finished")
            return {"shard": self.shard, "count": self.count, "requeues": restarts}
        command_text = f"clustertune-data prepare --shard {self.shard}/{self.count}"
        if code < 0:  # a requeue, preemption, cancel or time limit: SLURM decides what follows
            raise PrepareFailed(
                f"{command_text} was ended by {signal.Signals(-code).name}. A requeued or "
                "preempted task runs again and keeps the shards it finished; a cancelled one "
                "cancels the training waiting on this array (submit the same command again: "
                "only the missing shards are prepared)."
            )
        why = (
            "the config or data was refused (the line above says why)"
            if code == EXIT_USER_ERROR
            else "see the log above"
        )
        raise PrepareFailed(
            f"{command_text} exited with {code}: {why}. The training waiting on this array is "
            "cancelled; submitting the same command again prepares only the missing shards."
        )

    def checkpoint(self) -> Any:
        """submitit's hook on the time-limit warning: rerun the same task. The shards it
        finished are kept; the one it was writing is made again."""
        import submitit  # loaded already: submitit is what runs this job

        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class PrepareStage:
    """The checked prepare array: its tasks and what it will find."""

    tasks: tuple[PrepareJob, ...]
    prepared_dir: Path
    # shards of the set (tasks x splits of every source) not present and intact now
    missing: int
    total: int

    def describe(self) -> str:
        count = len(self.tasks)
        cpus = self.tasks[0].num_proc
        state = (
            "none present yet"
            if self.missing == self.total
            else f"{self.total - self.missing} of {self.total} present, kept"
        )
        return (
            f"prepare: array of {count} CPU task(s) (task i: --shard i/{count}, "
            f"{f'--num_proc {cpus}' if cpus else 'data.num_proc'}) -> {self.prepared_dir} "
            f"({self.total} shard(s): {state}); the training starts after every task succeeds"
        )


def check_prepare_request(count: int, recipe_argv: tuple[str, ...] | list[str]) -> None:
    """What --prepare-shards asks, before the config is read: a count and a training recipe."""
    if count < 1:
        raise UserError(
            f"--prepare-shards {count}: give at least 1 array task (one shard of the data each)."
        )
    script = recipe_argv[0] if recipe_argv else ""
    if Path(script).name != TRAINING_RECIPE:
        raise UserError(
            f"--prepare-shards prepares the training data of recipes/{TRAINING_RECIPE}, not of "
            f"'{script}'; drop --prepare-shards, or submit recipes/{TRAINING_RECIPE}."
        )


def plan_prepare(
    cfg: Any, recipe_argv: tuple[str, ...], count: int, num_proc: int | None, workdir: Path
) -> tuple[PrepareStage, list[str]]:
    """The prepare array for the parsed training config `cfg` (FinetuneConfig): its data checked
    as `clustertune-data prepare` checks it before tokenising (clustertune.prepare.
    plan_preparation), and the set already in data.prepared_dir, nothing written. Run it in
    the job's working directory and environment (the same folder as the job's).
    Returns the stage and warnings."""
    from clustertune.prepare import find_prepared, plan_preparation

    prepared, exists = find_prepared(plan_preparation(cfg), count)
    if exists and prepared.count != count:
        raise UserError(
            f"--prepare-shards {count}: '{prepared.root}' is prepared in {prepared.count} "
            f"shards already; use --prepare-shards {prepared.count}, or another "
            "data.prepared_dir (or remove that folder)."
        )
    missing, total = len(prepared.missing()), len(prepared.shards())
    warnings = []
    if not missing:
        warnings.append(
            f"the prepared data in {prepared.root} is complete already: the {count} prepare "
            "task(s) will find their shards and end at once (drop --prepare-shards to skip them)."
        )
    tasks = tuple(
        PrepareJob(
            config_argv=tuple(recipe_argv[1:]),
            shard=index,
            count=count,
            num_proc=num_proc,
            workdir=str(workdir),
        )
        for index in range(count)
    )
    return PrepareStage(tasks, prepared.root.resolve(), missing, total), warnings
