"""`clustertune-submit`: run a recipe on SLURM through submitit, one task per node.

    clustertune-submit --config slurm/cluster.yaml --nodes 2 --launch launch/zero2.yaml \
        -- recipes/finetune.py --config recipes/configs/flan_t5_base/full.yaml
    clustertune-submit --config slurm/dev-cluster.yaml --then evaluate \
        --eval-config recipes/configs/smoke/evaluate.yaml --wait -- recipes/finetune.py ...
    clustertune-submit ... --dry-run   # print the sbatch file(s) and per-node commands only

Cluster settings (`SlurmSettings`) come from a YAML in slurm/; a few flags override it.

Each of the job's N tasks (one per node) computes its node's `accelerate launch` arguments
from SLURM's variables (clustertune.slurm_env) and runs clustertune-launch. Stopping and
requeueing, as verified on the local dev cluster (slurm/dev-cluster, Slurm 22.05):
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
- The requeued job reruns the same command: `resume: auto` continues from the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustertune.config import config_from_dict, load_yaml_mapping
from clustertune.errors import UserError, exit_on_user_error
from clustertune.slurm_env import NodeLaunch, accelerate_launch_argv, launch_args_from_env
from clustertune.stop import EXIT_OK, EXIT_REQUEUE, EXIT_USER_ERROR, STOP_SIGNALS, launcher_preexec

EVALUATE_RECIPE = "recipes/evaluate.py"
# sbatch's --signal fires this long before the time limit at the latest; a smaller delay
# leaves no time to finish the step in flight and save.
MIN_SIGNAL_DELAY_S = 30
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
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")


@dataclass
class SlurmSettings:
    # Partition (`sinfo -s` lists them); empty: the cluster's default partition.
    partition: str | None = None
    # Account and quality of service, where the cluster requires them.
    account: str | None = None
    qos: str | None = None
    # Nodes of the allocation; one task per node runs that node's processes.
    nodes: int = 1
    # GPUs per node; 0 for CPU-only nodes (then set processes_per_node).
    gpus_per_node: int = 0
    # Training processes per node; default: one per GPU. world size = nodes x this.
    processes_per_node: int | None = None
    # CPUs per node for its task (data loading and the launcher run inside it).
    cpus_per_task: int | None = None
    # Memory per node in GB (empty: the partition's default).
    mem_gb: float | None = None
    # Wall-clock limit per run of the job, a quoted SLURM time: 'MM', 'HH:MM:SS' or 'D-HH:MM:SS'.
    time: str = "01:00:00"
    # Node features to require (sbatch --constraint), e.g. a100.
    constraint: str | None = None
    # accelerate launch file: launch/ddp.yaml, launch/zero2.yaml, ...
    launch: str = "launch/ddp.yaml"
    # Further sbatch options as long flags, e.g. [--exclusive, --mail-type=END].
    sbatch_flags: list[str] = field(default_factory=list)
    # Shell lines run before the tasks start, e.g. [module load cuda/12.4, source .venv/bin/activate].
    setup: list[str] = field(default_factory=list)
    # Environment variables for the job, e.g. {HF_HUB_OFFLINE: '1'}.
    env: dict[str, str] = field(default_factory=dict)
    # Requeues after a stop with a checkpoint (time limit, preemption), SLURM's own included.
    max_requeues: int = 3
    # The warning signal (USR2) comes this many seconds before the time limit: enough to finish
    # the step in flight and write a checkpoint (ZeRO-3 of a 3B model: ~1 min on fast storage).
    signal_delay_s: int = 120
    # submitit's folder for sbatch files and logs (%j: job id); must be on shared storage.
    folder: str = "slurm_logs/%j"
    # Job name shown by squeue; the evaluation job of a chain gets "-eval" appended.
    job_name: str = "clustertune"


def parse_time_minutes(value: str) -> int:
    """SLURM time formats -> minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if match is None:
        raise UserError(
            f"time={value!r} is not a SLURM time; use 'MM', 'HH:MM:SS' or 'D-HH:MM:SS'."
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:  # H:M:S
        hours, minutes, seconds = int(first), int(second), int(third)
    else:  # M or M:S
        hours, minutes, seconds = 0, int(first), int(second or 0)
    total_s = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total_s <= 0:
        raise UserError(f"time={value!r} is zero; give the job some time.")
    return -(-total_s // 60)


def load_settings(path: str | None, overrides: dict[str, Any]) -> SlurmSettings:
    """Settings from a YAML in slurm/ plus command-line overrides; unknown keys are refused."""
    raw = load_yaml_mapping(path) if path else {}
    where = f"'{path}'" if path else "the defaults"
    known = [f.name for f in dataclasses.fields(SlurmSettings)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(known)}."
            raise UserError(f"unknown SLURM setting '{key}' in {where}; {hint}")
    if isinstance(raw.get("time"), int):  # YAML reads 04:00:00 as 14400 and 90 as a number
        raise UserError(
            f"time in {where} must be a quoted string like '04:00:00' or '90' (minutes)."
        )
    raw.update({key: value for key, value in overrides.items() if value is not None})
    try:
        settings = config_from_dict(SlurmSettings, raw)
    except Exception as error:  # draccus' DecodingError: a string where a number belongs, ...
        raise UserError(f"invalid SLURM setting in {where}: {error}".replace("\n", " ")) from None
    if settings.processes_per_node is None:
        if settings.gpus_per_node < 1:
            raise UserError(
                "gpus_per_node is 0 (CPU-only nodes): set processes_per_node "
                "(or --processes-per-node) to the processes each node should run."
            )
        settings.processes_per_node = settings.gpus_per_node
    for name in ("nodes", "processes_per_node"):
        if getattr(settings, name) < 1:
            raise UserError(f"{name}={getattr(settings, name)} must be at least 1.")
    if settings.gpus_per_node < 0 or settings.max_requeues < 0:
        raise UserError("gpus_per_node and max_requeues cannot be negative.")
    if settings.gpus_per_node and settings.processes_per_node > settings.gpus_per_node:
        raise UserError(
            f"processes_per_node={settings.processes_per_node} is more than gpus_per_node="
            f"{settings.gpus_per_node}; run one process per GPU."
        )
    time_s = parse_time_minutes(settings.time) * 60
    if not MIN_SIGNAL_DELAY_S <= settings.signal_delay_s < time_s:
        raise UserError(
            f"signal_delay_s={settings.signal_delay_s} must be at least {MIN_SIGNAL_DELAY_S} "
            f"and less than time={settings.time!r} ({time_s} s)."
        )
    for flag in settings.sbatch_flags:
        if not flag.startswith("--") or len(flag) < 3:
            raise UserError(
                f"sbatch_flags entry {flag!r} must be a long option such as --exclusive "
                "or --mail-type=END."
            )
    return settings


def world_size(settings: SlurmSettings) -> int:
    return settings.nodes * settings.processes_per_node  # type: ignore[operator]


# --------------------------------------------------------------------------- the job itself


def _log(message: str) -> None:
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


class RequeueLimitReached(RuntimeError):
    """The workers saved a checkpoint and stopped, and the job may not be requeued again."""


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
        argv = accelerate_launch_argv(
            node, self.launch_config, self.recipe_argv[0], list(self.recipe_argv[1:])
        )
        flags = argv[2:]  # drop "accelerate launch": clustertune-launch takes the same arguments
        if self.is_deepspeed:
            # One launcher per node, like torchrun; accelerate's default for several machines
            # is pdsh, which would ssh into the other nodes itself.
            flags = ["--deepspeed_multinode_launcher", "standard", *flags]
        return [sys.executable, "-m", "clustertune.launch", *flags]

    def __call__(self) -> dict[str, Any]:
        env = os.environ
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        node = launch_args_from_env(env, self.processes_per_node)
        command = self.command(node)
        where = f"node {env.get('SLURMD_NODENAME', '?')} (machine_rank {node.machine_rank} of {node.num_machines})"
        _log(
            f"job {env.get('SLURM_JOB_ID')} run {restarts + 1} (requeued {restarts} of at most "
            f"{self.max_requeues} times) on {where}: {shlex.join(command)}"
        )
        code, received = self._run_forwarding_signals(command)
        if code == EXIT_OK:
            _log(f"finished on {where}")
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
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _run_forwarding_signals(self, command: list[str]) -> tuple[int, list[int]]:
        received: list[int] = []
        child: subprocess.Popen | None = None

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            _log(f"got {signal.Signals(signum).name}; forwarded to clustertune-launch")
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
        """The workers saved a checkpoint and stopped. Node 0 requeues; never returns."""
        job_id = os.environ["SLURM_JOB_ID"]
        signals = ", ".join(signal.Signals(s).name for s in received) or "no signal to this task"
        if machine_rank != 0:
            _log(f"checkpoint saved and stopped ({signals}); node 0 decides about the requeue")
            raise SystemExit(EXIT_REQUEUE)  # no result file: the job is not finished
        state = (job_fields(job_id) or {}).get("JobState", "UNKNOWN")
        if state != "RUNNING":
            _log(
                f"checkpoint saved and stopped ({signals}); SLURM is ending the job ({state}: "
                "requeued, preempted, cancelled or out of time), so it is not requeued from here. "
                "A cancelled job continues from the checkpoint when the same command is submitted again."
            )
            raise SystemExit(EXIT_REQUEUE)
        if restarts >= self.max_requeues:
            raise RequeueLimitReached(
                f"checkpoint saved and stopped ({signals}), but job {job_id} was requeued {restarts} "
                f"times already (max_requeues={self.max_requeues}); submit the same command again to "
                "continue from the checkpoint."
            )
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        _log(
            f"checkpoint saved and stopped ({signals}); requeued job {job_id} "
            f"(requeue {restarts + 1} of at most {self.max_requeues}); it resumes from the checkpoint"
        )
        raise SystemExit(EXIT_REQUEUE)


# --------------------------------------------------------------------------- preflight


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def _hub_cache(env: dict[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(
        env.get("HF_HOME")
        or Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"
    )
    return home.expanduser() / "hub"


def _in_hub_cache(repo_id: str, repo_type: str, env: dict[str, str]) -> bool:
    folder = _hub_cache(env) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if repo_type == "dataset" and not folder.is_dir():
        datasets_home = env.get("HF_DATASETS_CACHE") or str(_hub_cache(env).parent / "datasets")
        return (Path(datasets_home).expanduser() / repo_id.replace("/", "___")).is_dir()
    return (folder / "snapshots").is_dir()


def _check_model_and_data(cfg: Any, workdir: Path, env: dict[str, str]) -> None:
    offline = _truthy(env.get("HF_HUB_OFFLINE"))
    hint = "download it on a machine with access (huggingface-cli download) or point the setting at a local copy"
    model = cfg.model.name_or_path
    if _looks_local(model) and not (workdir / model).expanduser().exists():
        raise UserError(f"model.name_or_path '{model}' does not exist; fix the path.")
    if not _looks_local(model) and offline and not _in_hub_cache(model, "model", env):
        raise UserError(
            f"model '{model}' is not in the Hugging Face cache ({_hub_cache(env)}) and "
            f"HF_HUB_OFFLINE=1 on the nodes; {hint}."
        )
    data = cfg.data
    for key in ("train_file", "eval_file"):
        name = getattr(data, key)
        if not name:
            continue
        local = _looks_local(name) or Path(name).suffix in (".jsonl", ".json", ".csv", ".parquet")
        if local and not (workdir / name).expanduser().exists():
            raise UserError(f"data.{key} '{name}' does not exist; fix the path.")
        if not local and offline and not _in_hub_cache(name, "dataset", env):
            raise UserError(
                f"dataset '{name}' (data.{key}) is not in the Hugging Face cache and "
                f"HF_HUB_OFFLINE=1 on the nodes; {hint}."
            )
    if data.dataset and offline and not _in_hub_cache(data.dataset, "dataset", env):
        raise UserError(
            f"dataset '{data.dataset}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
            f"on the nodes; {hint}."
        )


@contextlib.contextmanager
def _working_directory(path: Path):  # contextlib.chdir needs Python 3.11
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _node_local(path: Path) -> bool:
    prefixes = [
        *NODE_LOCAL_PREFIXES,
        *(os.environ[v] for v in ("TMPDIR", "SLURM_TMPDIR") if os.environ.get(v)),
    ]
    return any(path == Path(p) or Path(p) in path.parents for p in prefixes)


def _launch_file(settings: SlurmSettings, workdir: Path) -> tuple[Path, dict[str, Any]]:
    path = (workdir / settings.launch).resolve()
    if not path.is_file():
        shipped = ", ".join(
            sorted(str(p.relative_to(workdir)) for p in (workdir / "launch").glob("*.yaml"))
        )
        raise UserError(
            f"launch file '{settings.launch}' does not exist; use one of: {shipped or 'launch/*.yaml'}."
        )
    launch = load_yaml_mapping(path)
    ds_file = (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not (workdir / ds_file).is_file():
        raise UserError(
            f"{settings.launch} names the DeepSpeed config '{ds_file}', which does not exist "
            f"(relative to {workdir}); submit from the project root."
        )
    return path, launch


def _partitions(warnings: list[str]) -> list[str] | None:
    """The cluster's partitions, or None where sinfo is missing or cannot reach a controller."""
    if shutil.which("sinfo") is None:
        return None
    shown = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if shown.returncode != 0:
        reason = (shown.stderr.strip().splitlines() or ["no message"])[-1]
        warnings.append(f"cannot check the partition: sinfo failed ({reason}).")
        return None
    return [name.rstrip("*") for name in shown.stdout.split()]


@dataclass
class Plan:
    """What will be submitted: checked settings, the jobs' callables and the run's output_dir."""

    settings: SlurmSettings
    folder: Path
    train: LaunchJob
    evaluate: LaunchJob | None
    output_dir: Path | None
    warnings: list[str]


def preflight(
    settings: SlurmSettings,
    recipe_argv: Sequence[str],
    *,
    workdir: Path,
    then: str | None = None,
    eval_config: str | None = None,
    eval_launch: str | None = None,
) -> Plan:
    """Every mistake we can see before submitting, each as one UserError; warnings returned."""
    warnings: list[str] = []
    if not recipe_argv:
        raise UserError(
            "no recipe given; put it after --, e.g. -- recipes/finetune.py --config recipes/configs/smoke/lora.yaml"
        )
    script = recipe_argv[0]
    if not (workdir / script).is_file():
        raise UserError(
            f"recipe '{script}' does not exist (relative to {workdir}); check the path after --."
        )
    if settings.partition:  # where sinfo exists: a dry run on a laptop skips this check
        partitions = _partitions(warnings)
        if partitions is not None and settings.partition not in partitions:
            raise UserError(
                f"partition '{settings.partition}' does not exist on this cluster; "
                f"available: {', '.join(partitions) or 'none'} (sinfo -s)."
            )
    launch_path, launch = _launch_file(settings, workdir)
    world = world_size(settings)
    distributed = str(launch.get("distributed_type", "NO")).upper()
    if distributed == "NO" and world != 1:
        raise UserError(
            f"{settings.launch} runs a single process (distributed_type: NO) but nodes x processes_per_node "
            f"= {settings.nodes} x {settings.processes_per_node} = {world}; use launch/ddp.yaml or a "
            "launch/zero*.yaml, or --nodes 1 --processes-per-node 1."
        )

    output_dir = None
    if Path(script).name == "finetune.py":
        from clustertune.config import FinetuneConfig, parse_config
        from clustertune.sampler import check_batch_arithmetic

        with _working_directory(workdir):  # the recipe's relative paths, as the job sees them
            cfg = parse_config(FinetuneConfig, list(recipe_argv[1:]))
        check_batch_arithmetic(
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            world,
            world="the world size (nodes x processes_per_node)",
        )
        job_env = {**os.environ, **settings.env}
        _check_model_and_data(cfg, workdir, job_env)
        output_dir = (workdir / cfg.output_dir).resolve()
    folder = (workdir / settings.folder).resolve()
    for what, path in (("output_dir", output_dir), ("folder", folder)):
        if path is not None and _node_local(path):
            warnings.append(
                f"{what} {path} looks node-local; every node must see it (use shared storage)."
            )

    job = LaunchJob(
        launch_config=str(launch_path),
        processes_per_node=settings.processes_per_node,
        recipe_argv=tuple(recipe_argv),
        workdir=str(workdir),
        max_requeues=settings.max_requeues,
        is_deepspeed=distributed == "DEEPSPEED",
    )
    evaluate = None
    if then is not None:
        if then != "evaluate":
            raise UserError(f"--then {then!r}: only 'evaluate' can follow a training job.")
        if output_dir is None:
            raise UserError(
                "--then evaluate needs a training recipe with an output_dir (recipes/finetune.py)."
            )
        if not (workdir / EVALUATE_RECIPE).is_file():
            raise UserError(
                f"--then evaluate needs {EVALUATE_RECIPE}, which does not exist in {workdir}."
            )
        if eval_config is not None and not (workdir / eval_config).is_file():
            raise UserError(f"--eval-config '{eval_config}' does not exist.")
        eval_settings = dataclasses.replace(settings, launch=eval_launch or settings.launch)
        eval_path, eval_launch_data = _launch_file(eval_settings, workdir)
        eval_distributed = str(eval_launch_data.get("distributed_type", "NO")).upper()
        if eval_distributed == "NO" and world != 1:
            raise UserError(
                f"--eval-launch {eval_settings.launch} runs a single process but the job has "
                f"{world}; use launch/ddp.yaml."
            )
        eval_argv = (
            EVALUATE_RECIPE,
            *(("--config", eval_config) if eval_config else ()),
            f"--run_dir={output_dir}",
            f"--output_dir={output_dir / 'eval'}",
        )
        evaluate = dataclasses.replace(
            job,
            launch_config=str(eval_path),
            recipe_argv=eval_argv,
            max_requeues=0,
            is_deepspeed=eval_distributed == "DEEPSPEED",
        )
    return Plan(
        settings=settings,
        folder=folder,
        train=job,
        evaluate=evaluate,
        output_dir=output_dir,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- submitit


def _sbatch_memory(mem_gb: float | None) -> str | None:
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{round(mem_gb * 1024)}M"


def _sbatch_parameters(
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
        signal_delay_s=settings.signal_delay_s,  # minutes, as submitit expects
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


def make_executor(
    folder: Path, parameters: dict[str, Any], max_requeues: int, *, render_only: bool = False
) -> Any:
    """submitit's SLURM executor. SlurmExecutor rather than AutoExecutor: we only ever target
    SLURM, and a dry run must render the sbatch file where srun is missing (render_only)."""
    import submitit

    class RenderOnlySlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # skip the "is srun installed" check; never submits
            return 1

    # max_num_timeout bounds submitit's own requeues (LaunchJob.checkpoint, before __call__ runs).
    executor = (RenderOnlySlurmExecutor if render_only else submitit.SlurmExecutor)(
        folder=folder, max_num_timeout=max_requeues
    )
    executor.update_parameters(**parameters)
    return executor


def sbatch_text(executor: Any) -> str:
    """The sbatch file submitit writes for this executor (its own renderer)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def node_command_text(job: LaunchJob, settings: SlurmSettings) -> str:
    placeholder = NodeLaunch(
        num_machines=settings.nodes,
        machine_rank="$SLURM_NODEID",  # type: ignore[arg-type]
        main_process_ip="<address of the first node of $SLURM_JOB_NODELIST>",
        main_process_port="<20000 + $SLURM_JOB_ID % 40001>",  # type: ignore[arg-type]
        num_processes=world_size(settings),
    )
    return " ".join(
        arg if arg.startswith(("$", "<")) else shlex.quote(arg) for arg in job.command(placeholder)
    )


def describe_plan(plan: Plan) -> str:
    s = plan.settings
    lines = [
        f"job: {s.nodes} node(s) x {s.processes_per_node} process(es) = world size {world_size(s)}, "
        f"{s.launch}, time {s.time}, requeues <= {s.max_requeues}"
    ]
    if plan.output_dir:
        lines.append(f"output_dir: {plan.output_dir}")
    return "\n".join(lines)


def dry_run(plan: Plan) -> str:
    s = plan.settings
    parts = [describe_plan(plan), ""]
    jobs = [("training", plan.train, None, s.job_name)]
    if plan.evaluate is not None:
        jobs.append(("evaluation", plan.evaluate, "afterok:TRAINING_JOB_ID", f"{s.job_name}-eval"))
    for title, job, dependency, name in jobs:
        executor = make_executor(
            plan.folder, _sbatch_parameters(s, name, dependency), job.max_requeues, render_only=True
        )
        parts += [
            f"# ---- sbatch file of the {title} job (submitit; %j is the job id) ----",
            sbatch_text(executor),
            f"# ---- each of its {s.nodes} task(s) (one per node) runs ----",
            node_command_text(job, s),
            "",
        ]
    return "\n".join(parts)


@dataclass
class Submitted:
    job_id: str
    title: str
    folder: Path

    def log_paths(self, nodes: int) -> list[Path]:
        folder = Path(str(self.folder).replace("%j", self.job_id))
        return [
            folder / f"{self.job_id}_{rank}_log.{ext}"
            for rank in range(nodes)
            for ext in ("out", "err")
        ]


def submit(plan: Plan) -> list[Submitted]:
    s = plan.settings
    executor = make_executor(plan.folder, _sbatch_parameters(s, s.job_name, None), s.max_requeues)
    train = executor.submit(plan.train)
    submitted = [Submitted(train.job_id, "training", plan.folder)]
    if plan.evaluate is not None:
        eval_executor = make_executor(
            plan.folder, _sbatch_parameters(s, f"{s.job_name}-eval", f"afterok:{train.job_id}"), 0
        )
        evaluate = eval_executor.submit(plan.evaluate)
        submitted.append(
            Submitted(
                evaluate.job_id, f"evaluation (after job {train.job_id} succeeds)", plan.folder
            )
        )
    return submitted


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


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustertune-submit",
        usage="clustertune-submit [--config slurm/<cluster>.yaml] [options] -- RECIPE [recipe args]",
        description="Run a recipe on SLURM (submitit): one task per node, each running clustertune-launch. "
        "Flags override the settings YAML.",
    )
    parser.add_argument(
        "--config", help="cluster settings YAML (slurm/cluster.yaml, slurm/dev-cluster.yaml)"
    )
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument(
        "--processes-per-node", type=int, help="default: gpus per node; set it on CPU-only nodes"
    )
    parser.add_argument("--partition")
    parser.add_argument("--time", help="SLURM time limit per run, e.g. 04:00:00")
    parser.add_argument("--launch", help="accelerate launch file, e.g. launch/zero2.yaml")
    parser.add_argument(
        "--then",
        choices=["evaluate"],
        help="submit recipes/evaluate.py after the training succeeds",
    )
    parser.add_argument("--eval-config", help="evaluation config for --then evaluate")
    parser.add_argument(
        "--eval-launch", help="launch file of the evaluation job (default: --launch)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="block until the job(s) end; exit 1 if one failed"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch file(s) and per-node commands only"
    )
    return parser


def parse_command_line(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, recipe = argv[:split], argv[split + 1 :]
    else:
        own, recipe = argv, []
    args = _parser().parse_args(own)
    if not recipe and not any(a in own for a in ("-h", "--help")):
        raise UserError(
            "no recipe given; end the options with -- and the recipe, e.g. "
            "-- recipes/finetune.py --config recipes/configs/smoke/lora.yaml"
        )
    return args, recipe


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args, recipe = parse_command_line(sys.argv[1:] if argv is None else argv)
    overrides = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "processes_per_node": args.processes_per_node,
        "partition": args.partition,
        "time": args.time,
        "launch": args.launch,
    }
    settings = load_settings(args.config, overrides)
    workdir = Path.cwd()
    plan = preflight(
        settings,
        recipe,
        workdir=workdir,
        then=args.then,
        eval_config=args.eval_config,
        eval_launch=args.eval_launch,
    )
    for warning in plan.warnings:
        print(f"clustertune-submit: warning: {warning}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(dry_run(plan), flush=True)
        return 0
    submitted = submit(plan)
    print(describe_plan(plan))
    for job in submitted:
        logs = job.log_paths(settings.nodes)
        print(
            f"submitted job {job.job_id}: {job.title}\n  logs: {logs[0].parent}/{job.job_id}_<node>_log.{{out,err}} "
            f"(node 0: {logs[0].name})\n  follow: tail -F {' '.join(str(p) for p in logs)}",
            flush=True,
        )
    if args.wait:
        try:
            return 0 if wait(submitted) else 1
        except KeyboardInterrupt:
            ids = " ".join(job.job_id for job in submitted)
            print(
                f"\nstopped waiting; the job(s) keep running (squeue -j {ids.replace(' ', ',')}; scancel {ids})",
                file=sys.stderr,
            )
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
