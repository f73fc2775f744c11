"""Submission through submitit: sbatch parameters, the executor, submitting a plan, waiting.

A checked `SubmissionPlan` (clustertune.slurm.preflight) becomes one submitit job (its `LaunchJob`, one
task per node), chained with afterok: after the prepare array when there is one (N `PrepareJob`
tasks, one submitit array), and before the evaluation when it follows the training.
`wait` follows the jobs with scontrol (sacct once the controller forgot them).
`dry_run` renders what would be submitted: submitit's sbatch files and each task's command.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Imported when this module loads, not when the first executor is made: submitit configures
# logging at import (logging.config.dictConfig), which shuts down every logging handler that
# exists at that moment, and a handler closes its stream if that stream is no longer
# sys.stderr. absl's handler (rouge_score imports absl) keeps the sys.stderr of the moment it
# was created; imported mid-run, submitit closed that stream once it had been swapped (pytest
# captures output per test: a later test then crashed on pytest's own closed capture file),
# and pointed its own handlers at the sys.stdout/err of the moment. At module load both happen
# at start-up, before anything swaps the streams.
import submitit

from clustertune.slurm.env import PORT_MAX, PORT_MIN, NodeLaunch
from clustertune.slurm.job import LaunchJob, job_fields
from clustertune.slurm.prepare import PrepareStage
from clustertune.slurm.settings import SlurmSettings, parse_time_minutes

if TYPE_CHECKING:
    from clustertune.slurm.preflight import SubmissionPlan

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
}


def _sbatch_memory(mem_gb: float | None) -> str | None:
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{round(mem_gb * 1024)}M"


def sbatch_parameters(
    settings: SlurmSettings, job_name: str, dependency: str | None
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per node, USR2 signal_delay_s before the end."""
    extra: dict[str, Any] = {}
    for flag in settings.sbatch_flags:
        key, has_value, value = flag[2:].partition("=")
        extra[key] = value if has_value else True
    extra.setdefault("requeue", True)  # the job may be requeued after a stop with a checkpoint
    parameters: dict[str, Any] = dict(
        job_name=job_name,
        nodes=settings.nodes,
        ntasks_per_node=1,
        time=parse_time_minutes(settings.time),
        signal_delay_s=settings.signal_delay_s,
        setup=[
            *(f"export {name}={shlex.quote(str(value))}" for name, value in settings.env.items()),
            *settings.setup,
        ],
    )
    if dependency:
        parameters["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed training cancels its evaluation
    optional = dict(
        gpus_per_node=settings.gpus_per_node or None,
        cpus_per_task=settings.cpus_per_task,
        mem=_sbatch_memory(settings.mem_gb),
        partition=settings.partition,
        account=settings.account,
        qos=settings.qos,
        constraint=settings.constraint,
    )
    parameters.update({key: value for key, value in optional.items() if value is not None})
    parameters["additional_parameters"] = extra
    return parameters


def prepare_sbatch_parameters(settings: SlurmSettings) -> dict[str, Any]:
    """Each task of the prepare array: one CPU-only task (no GPUs) with prepare_cpus_per_task
    (else cpus_per_task) CPUs, on prepare_partition (else partition). Account, qos, time,
    signal delay, requeue, env and setup lines are the training's: the tasks see the
    environment the training sees, so both resolve the same data.prepared_dir. Not taken:
    mem_gb and constraint (what a training node needs), and --exclusive from sbatch_flags (a
    whole node per task would hold N nodes for work that needs their CPUs only)."""
    parameters = sbatch_parameters(settings, f"{settings.job_name}-prepare", None)
    for key in ("gpus_per_node", "mem", "constraint"):
        parameters.pop(key, None)
    parameters["nodes"] = 1
    cpus = settings.prepare_cpus_per_task or settings.cpus_per_task
    if cpus:
        parameters["cpus_per_task"] = cpus
    if settings.prepare_partition:
        parameters["partition"] = settings.prepare_partition
    parameters["additional_parameters"].pop("exclusive", None)
    return parameters


class _RenderOnlySlurmExecutor(submitit.SlurmExecutor):
    @classmethod
    def affinity(cls) -> int:  # skip the "is srun installed" check; never submits
        return 1


def make_executor(
    folder: Path, parameters: dict[str, Any], max_requeues: int, *, render_only: bool = False
) -> submitit.SlurmExecutor:
    """submitit's SLURM executor. SlurmExecutor rather than AutoExecutor: we only ever target
    SLURM, and a dry run must render the sbatch file where srun is missing (render_only)."""
    # max_num_timeout bounds submitit's own requeues (LaunchJob.checkpoint, before __call__ runs).
    executor = (_RenderOnlySlurmExecutor if render_only else submitit.SlurmExecutor)(
        folder=folder, max_num_timeout=max_requeues
    )
    executor.update_parameters(**parameters)
    return executor


def sbatch_text(executor: submitit.SlurmExecutor) -> str:
    """The sbatch file submitit writes for this executor (its own renderer)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


@dataclass
class Submitted:
    job_id: str  # an array task's is <array job id>_<task index>
    title: str
    folder: Path
    nodes: int = 1
    array_id: str | None = None  # the array this job is a task of

    def log_paths(self) -> list[Path]:
        folder = Path(str(self.folder).replace("%j", self.job_id))
        return [
            folder / f"{self.job_id}_{rank}_log.{ext}"
            for rank in range(self.nodes)
            for ext in ("out", "err")
        ]


def _submit_prepare(plan: SubmissionPlan, stage: PrepareStage) -> tuple[str, list[Submitted]]:
    """The prepare array (one submitit batch: task i runs shard i); its job id and tasks."""
    s = plan.settings
    executor = make_executor(plan.folder, prepare_sbatch_parameters(s), s.max_requeues)
    with executor.batch():
        jobs = [executor.submit(task) for task in stage.tasks]
    array_id, _, task = jobs[0].job_id.partition("_")  # one task alone is a plain job
    count = len(jobs)
    return array_id, [
        Submitted(
            job.job_id,
            f"prepare shard {index + 1} of {count}",
            plan.folder,
            array_id=array_id if task else None,
        )
        for index, job in enumerate(jobs)
    ]


def submit(plan: SubmissionPlan) -> list[Submitted]:
    """Submit the plan's jobs in order, each waiting on the one before (afterok): the prepare
    array's tasks (if any), the training, the evaluation (if any)."""
    s = plan.settings
    submitted: list[Submitted] = []
    after = None
    title = "training"
    if plan.prepare is not None:
        array_id, tasks = _submit_prepare(plan, plan.prepare)
        submitted += tasks
        after = f"afterok:{array_id}"  # an array's id: every task of it
        what = "array" if tasks[0].array_id else "job"
        title = f"training (after {what} {array_id} succeeds)"
    executor = make_executor(plan.folder, sbatch_parameters(s, s.job_name, after), s.max_requeues)
    train = executor.submit(plan.train)
    submitted.append(Submitted(train.job_id, title, plan.folder, s.nodes))
    if plan.evaluate is not None:
        eval_executor = make_executor(
            plan.folder, sbatch_parameters(s, f"{s.job_name}-eval", f"afterok:{train.job_id}"), 0
        )
        evaluate = eval_executor.submit(plan.evaluate)
        submitted.append(
            Submitted(
                evaluate.job_id,
                f"evaluation (after job {train.job_id} succeeds)",
                plan.folder,
                s.nodes,
            )
        )
    return submitted


def describe_submitted(submitted: list[Submitted]) -> str:
    """What was submitted and where each job logs. The tasks of an array share one entry."""
    lines: list[str] = []
    for job in submitted:
        if job.array_id is not None:
            tasks = [task for task in submitted if task.array_id == job.array_id]
            if job is tasks[0]:
                folder = Path(str(job.folder).replace("%j", f"{job.array_id}_<task>"))
                lines.append(
                    f"submitted job {job.array_id}: prepare array of {len(tasks)} task(s), "
                    f"{tasks[0].job_id} to {tasks[-1].job_id} (task i: --shard i/{len(tasks)})\n"
                    f"  logs: {folder}/{job.array_id}_<task>_0_log.{{out,err}}\n"
                    f"  follow: tail -F {' '.join(str(p) for p in job.log_paths())}"
                )
            continue
        logs = job.log_paths()
        lines.append(
            f"submitted job {job.job_id}: {job.title}\n"
            f"  logs: {logs[0].parent}/{job.job_id}_<node>_log.{{out,err}} (node 0: {logs[0].name})\n"
            f"  follow: tail -F {' '.join(str(p) for p in logs)}"
        )
    return "\n".join(lines)


def _final_state(job_id: str) -> dict[str, str]:
    shown = job_fields(job_id)
    if shown is not None:
        return shown
    # Purged from the controller (MinJobAge): ask accounting.
    found = subprocess.run(
        ["sacct", "-j", job_id, "-o", "JobID,State", "--parsable2", "-n"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    states = [line.split("|")[1].split()[0] for line in found if line.split("|")[0] == job_id]
    return {"JobState": states[-1] if states else "UNKNOWN"}


def wait(submitted: list[Submitted], poll_s: float = 2.0) -> bool:
    """Block until every job ended; print state changes and a summary. True if all completed."""
    began = time.monotonic()
    last: dict[str, tuple[str, str]] = {}
    ended: dict[str, dict[str, str]] = {}
    while len(ended) < len(submitted):
        for job in submitted:
            if job.job_id in ended:
                continue
            info = _final_state(job.job_id)
            state = info.get("JobState", "UNKNOWN")
            key = (state, info.get("Restarts", "0"))
            if last.get(job.job_id) != key:
                last[job.job_id] = key
                print(
                    f"[{time.monotonic() - began:6.1f} s] job {job.job_id} ({job.title}): {state}"
                    f"{', requeued ' + key[1] + ' time(s)' if key[1] != '0' else ''}",
                    flush=True,
                )
            if state in TERMINAL_STATES:
                ended[job.job_id] = {**info, "wall_s": f"{time.monotonic() - began:.1f}"}
        if len(ended) < len(submitted):
            time.sleep(poll_s)
    ok = True
    for job in submitted:
        info = ended[job.job_id]
        ok &= info["JobState"] == "COMPLETED"
        print(
            f"job {job.job_id} ({job.title}): {info['JobState']}, exit {info.get('ExitCode', '?')}, "
            f"requeued {info.get('Restarts', '?')} time(s), run time of the last run "
            f"{info.get('RunTime', '?')}, {info['wall_s']} s since submission",
            flush=True,
        )
        if info["JobState"] != "COMPLETED":
            folder = Path(str(job.folder).replace("%j", job.job_id))
            print(
                f"  why: {folder}/{job.job_id}_*_log.err (a dependent job is cancelled when its "
                "predecessor fails)",
                flush=True,
            )
    return ok


# --------------------------------------------------------------------------- dry run (--dry-run)


def node_command_text(job: LaunchJob, settings: SlurmSettings) -> str:
    """The command every task runs, with SLURM's per-node values left as placeholders."""
    placeholder = NodeLaunch(
        num_machines=settings.nodes,
        machine_rank="$SLURM_NODEID",  # type: ignore[arg-type]
        main_process_ip="<address of the first node of $SLURM_JOB_NODELIST>",
        main_process_port=f"<{PORT_MIN} + $SLURM_JOB_ID % {PORT_MAX - PORT_MIN + 1}>",  # type: ignore[arg-type]
        num_processes=settings.world_size,
    )
    return " ".join(
        arg if arg.startswith(("$", "<")) else shlex.quote(arg) for arg in job.command(placeholder)
    )


def describe_plan(plan: SubmissionPlan) -> str:
    s = plan.settings
    lines = [plan.prepare.describe()] if plan.prepare else []
    lines.append(
        f"job: {s.nodes} node(s) x {s.processes_per_node} process(es) = world size {s.world_size}, "
        f"{s.launch}, time {s.time}, requeues <= {s.max_requeues}"
    )
    if plan.output_dir:
        lines.append(f"output_dir: {plan.output_dir}")
    if plan.resume_note:
        lines.append(f"resume: {plan.resume_note}")
    return "\n".join(lines)


def prepare_command_text(stage: PrepareStage) -> str:
    """The command of every prepare task, its index as SLURM's variable (one task alone is a
    plain job, not an array: its command as it is)."""
    if len(stage.tasks) == 1:
        return shlex.join(stage.tasks[0].command())
    return shlex.join(stage.tasks[0].command(shard="@@")).replace("@@", "$SLURM_ARRAY_TASK_ID")


def dry_run(plan: SubmissionPlan) -> str:
    """What `--dry-run` prints: the plan, then per job its sbatch file and task command."""
    s = plan.settings
    parts = [describe_plan(plan), ""]
    if plan.prepare is not None:
        count = len(plan.prepare.tasks)
        executor = make_executor(
            plan.folder, prepare_sbatch_parameters(s), s.max_requeues, render_only=True
        )
        ids = "%j is the job id"
        if count > 1:  # what submitit sets when it submits a batch of several as one array
            executor.parameters["map_count"] = count
            ids = "%A is the array's job id, %a the task index"
        parts += [
            f"# ---- sbatch file of the prepare array ({count} task(s); submitit; {ids}) ----",
            sbatch_text(executor),
            f"# ---- each of its {count} task(s) runs (task i: --shard i/{count}) ----",
            prepare_command_text(plan.prepare),
            "",
        ]
    after_prepare = "afterok:PREPARE_ARRAY_JOB_ID" if plan.prepare is not None else None
    jobs = [("training", plan.train, after_prepare, s.job_name)]
    if plan.evaluate is not None:
        jobs.append(("evaluation", plan.evaluate, "afterok:TRAINING_JOB_ID", f"{s.job_name}-eval"))
    for title, job, dependency, name in jobs:
        executor = make_executor(
            plan.folder, sbatch_parameters(s, name, dependency), job.max_requeues, render_only=True
        )
        parts += [
            f"# ---- sbatch file of the {title} job (submitit; %j is the job id) ----",
            sbatch_text(executor),
            f"# ---- each of its {s.nodes} task(s) (one per node) runs ----",
            node_command_text(job, s),
            "",
        ]
    return "\n".join(parts)
