"""Preflight: every mistake visible before submitting, as one UserError each; the dry-run text.

`preflight` checks the recipe, the launch file against nodes x processes_per_node (an FSDP one
also as the job will, clustertune.fsdp.check_fsdp_settings), the batch arithmetic
(clustertune.sampler.check_batch_arithmetic, the rule training itself applies), model and data
paths or Hugging Face cache entries the offline nodes will need, with `--then evaluate` the
evaluation config (parsed and checked as recipes/evaluate.py will, its eval data included), with
`--prepare-shards N` the data as `clustertune-data prepare` checks it and the prepared set
already there (clustertune.slurm.prepare), and the partitions (where sinfo exists); it warns
about node-local output and data folders. It returns the `SubmissionPlan`: the checked settings
and the submitit jobs (clustertune.slurm.job.LaunchJob, clustertune.slurm.prepare.PrepareJob)
to run; clustertune.slurm.submit submits it, or renders it for --dry-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from clustertune.config import FinetuneConfig, load_yaml_mapping, parse_config
from clustertune.deepspeed_config import load_deepspeed_json, zero_stage
from clustertune.errors import UserError
from clustertune.evaluation.config import EvaluateConfig
from clustertune.evaluation.config import _check_values as check_resolved_values
from clustertune.fsdp import check_fsdp_settings, launch_file_settings
from clustertune.modeling import load_model_config
from clustertune.reshard import resume_plan
from clustertune.run_folder import CHECKPOINT_MARKER, EVAL_DIR, RunFolder
from clustertune.run_identity import FINAL_PROMPT_KEYS
from clustertune.sampler import check_batch_arithmetic
from clustertune.slurm.job import LaunchJob
from clustertune.slurm.node import distributed_type
from clustertune.slurm.prepare import PrepareStage, check_prepare_request, plan_prepare
from clustertune.slurm.settings import SlurmSettings

EVALUATE_RECIPE = "recipes/evaluate.py"
# What can follow a training job in the same submission (--then).
Then = Literal["evaluate"]
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
DOWNLOAD_HINT = (
    "download it on a machine with access (huggingface-cli download) or point the setting at "
    "a local copy"
)


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
    model = cfg.model.name_or_path
    if _looks_local(model) and not (workdir / model).expanduser().exists():
        raise UserError(f"model.name_or_path '{model}' does not exist; fix the path.")
    if not _looks_local(model) and offline and not _in_hub_cache(model, "model", env):
        raise UserError(
            f"model '{model}' is not in the Hugging Face cache ({_hub_cache(env)}) and "
            f"HF_HUB_OFFLINE=1 on the nodes; {DOWNLOAD_HINT}."
        )
    _check_data_sources(cfg.data, ("train_file", "eval_file"), workdir, env)


def _check_data_sources(
    data: Any, file_keys: Sequence[str], workdir: Path, env: dict[str, str]
) -> None:
    """The data files (`file_keys` of the data section) and hub dataset the job will read."""
    offline = _truthy(env.get("HF_HUB_OFFLINE"))
    for key in file_keys:
        name = getattr(data, key)
        if not name:
            continue
        local = _looks_local(name) or Path(name).suffix in (".jsonl", ".json", ".csv", ".parquet")
        if local and not (workdir / name).expanduser().exists():
            raise UserError(f"data.{key} '{name}' does not exist; fix the path.")
        if not local and offline and not _in_hub_cache(name, "dataset", env):
            raise UserError(
                f"dataset '{name}' (data.{key}) is not in the Hugging Face cache and "
                f"HF_HUB_OFFLINE=1 on the nodes; {DOWNLOAD_HINT}."
            )
    if data.dataset and offline and not _in_hub_cache(data.dataset, "dataset", env):
        raise UserError(
            f"dataset '{data.dataset}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
            f"on the nodes; {DOWNLOAD_HINT}."
        )


def _check_evaluation(
    eval_argv: Sequence[str],
    eval_config: str | None,
    training: FinetuneConfig,
    workdir: Path,
    env: dict[str, str],
) -> None:
    """The evaluation job's config, parsed and checked as recipes/evaluate.py will, so that a
    mistake in it fails now and not after the training. The run_dir does not exist yet: the
    prompt settings the evaluation takes from it (FINAL_PROMPT_KEYS, unless the eval config
    sets them) are those of the training config being submitted."""
    where = (
        f"--eval-config {eval_config}" if eval_config else "--then evaluate without --eval-config"
    )
    try:
        with _working_directory(workdir):  # the eval job's relative paths, as it sees them
            cfg = parse_config(EvaluateConfig, list(eval_argv[1:]))
        from_run = {
            name: getattr(training.data, name)
            for name in FINAL_PROMPT_KEYS
            if getattr(cfg.data, name) is None
        }
        check_resolved_values(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **from_run))
        )
        _check_data_sources(cfg.data, ("eval_file",), workdir, env)
    except UserError as error:
        if eval_config:
            raise UserError(f"{where}: {error}") from None
        raise UserError(
            f"{where}: {str(error).rstrip('.')}; give an evaluation config with --eval-config, "
            "e.g. --eval-config recipes/configs/smoke/evaluate.yaml."
        ) from None


@contextlib.contextmanager
def _working_directory(path: Path):  # contextlib.chdir needs Python 3.11
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _job_environment(env: dict[str, str]):
    """os.environ as the jobs see it (the settings' env on top) while checking something that
    reads it, such as the prepared-data cache folder ($CLUSTERTUNE_CACHE)."""
    previous = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(previous)


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


def _check_fsdp_launch(
    where: str, launch: dict[str, Any], workdir: Path, model: Any = None
) -> None:
    """An FSDP launch file, checked as the job checks it (fsdp.check_fsdp_settings, the same
    line) as far as this machine can: the precision only where model.dtype is not auto (auto
    is resolved on the node), the wrapped classes where the model's config loads here."""
    settings = launch_file_settings(launch)
    if settings is None:
        return
    dtype = model_config = None
    if model is not None:
        dtype = None if model.dtype == "auto" else model.dtype
        if settings.wrap_classes:
            with _working_directory(workdir), contextlib.suppress(UserError):
                model_config = load_model_config(model.name_or_path)
    try:
        check_fsdp_settings(settings, dtype, model_config)
    except UserError as refused:
        raise UserError(f"{where}: {refused}") from None


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


def _resume_note(
    cfg: FinetuneConfig, output_dir: Path, launch: dict[str, Any], workdir: Path, world: int
) -> str | None:
    """The checkpoint the job will resume and whether it reshards it; a UserError for one this
    launch file cannot continue (the job's own check, reshard.resume_plan)."""
    if cfg.resume == "never":
        return None
    checkpoint = (
        RunFolder(output_dir).latest_complete()
        if cfg.resume == "auto"
        else (workdir / cfg.resume).resolve()
    )
    if checkpoint is None or not (checkpoint / CHECKPOINT_MARKER).is_file():
        return None
    ds_file = (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
    stage = zero_stage(load_deepspeed_json(str(workdir / ds_file))) if ds_file else 0
    engine = "fsdp2" if distributed_type(launch) == "FSDP" else ""
    note = resume_plan(checkpoint, world_size=world, zero_stage=stage, engine=engine)
    return note or f"continues {checkpoint} (saved on {world} rank(s), as this job)"


@dataclass
class SubmissionPlan:
    """What will be submitted: checked settings, the jobs' callables and the run's output_dir."""

    settings: SlurmSettings
    folder: Path
    train: LaunchJob
    evaluate: LaunchJob | None
    output_dir: Path | None
    warnings: list[str]
    # How the job continues the run's checkpoint on this world size (reshard.resume_plan)
    resume_note: str | None = None
    # The prepare array before the training (--prepare-shards)
    prepare: PrepareStage | None = None


def preflight(
    settings: SlurmSettings,
    recipe_argv: Sequence[str],
    *,
    workdir: Path,
    then: Then | None = None,
    eval_config: str | None = None,
    eval_launch: str | None = None,
    prepare_shards: int | None = None,
) -> SubmissionPlan:
    """Every mistake we can see before submitting, each as one UserError; warnings returned."""
    warnings: list[str] = []
    if not recipe_argv:
        raise UserError(
            "no recipe given; put it after --, e.g. -- recipes/finetune.py --config recipes/configs/smoke/lora.yaml"
        )
    if prepare_shards is not None:
        check_prepare_request(prepare_shards, recipe_argv)
    script = recipe_argv[0]
    if not (workdir / script).is_file():
        raise UserError(
            f"recipe '{script}' does not exist (relative to {workdir}); check the path after --."
        )
    partition_settings = ["partition"]
    if prepare_shards is not None:
        partition_settings.append("prepare_partition")
    wanted = {name: getattr(settings, name) for name in partition_settings}
    if any(wanted.values()):  # where sinfo exists: a dry run on a laptop skips this check
        partitions = _partitions(warnings)
        for name, partition in wanted.items():
            if partitions is not None and partition and partition not in partitions:
                raise UserError(
                    f"{name} '{partition}' does not exist on this cluster; "
                    f"available: {', '.join(partitions) or 'none'} (sinfo -s)."
                )
    launch_path, launch = _launch_file(settings, workdir)
    world = settings.world_size
    distributed = distributed_type(launch)
    if distributed == "NO" and world != 1:
        raise UserError(
            f"{settings.launch} runs a single process (distributed_type: NO) but nodes x processes_per_node "
            f"= {settings.nodes} x {settings.processes_per_node} = {world}; use launch/ddp.yaml or a "
            "launch/zero*.yaml, or --nodes 1 --processes-per-node 1."
        )

    output_dir = resume_note = prepare = None
    if Path(script).name != "finetune.py":
        _check_fsdp_launch(settings.launch, launch, workdir)
    else:
        with _working_directory(workdir):  # the recipe's relative paths, as the job sees them
            cfg = parse_config(FinetuneConfig, list(recipe_argv[1:]))
        _check_fsdp_launch(settings.launch, launch, workdir, cfg.model)
        if not cfg.train.micro_batch_tokens:  # a token budget splits any global batch
            check_batch_arithmetic(
                cfg.train.global_batch_size,
                cfg.train.micro_batch_size,
                world,
                world="the world size (nodes x processes_per_node)",
            )
        job_env = {**os.environ, **settings.env}
        _check_model_and_data(cfg, workdir, job_env)
        output_dir = (workdir / cfg.output_dir).resolve()
        try:
            resume_note = _resume_note(cfg, output_dir, launch, workdir, world)
        except UserError as refused:  # the job refuses it at start; said here, not decided
            warnings.append(f"the job will stop before training: {refused}")
        if prepare_shards is not None:
            with _working_directory(workdir), _job_environment(settings.env):
                prepare, prepare_warnings = plan_prepare(
                    cfg,
                    tuple(recipe_argv),
                    prepare_shards,
                    settings.prepare_cpus_per_task or settings.cpus_per_task,
                    workdir,
                )
            warnings += prepare_warnings
    folder = (workdir / settings.folder).resolve()
    prepared_dir = prepare.prepared_dir if prepare else None
    for what, path in (
        ("output_dir", output_dir),
        ("folder", folder),
        ("data.prepared_dir", prepared_dir),
    ):
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
        if then not in get_args(Then):
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
        _check_fsdp_launch(f"--eval-launch {eval_settings.launch}", eval_launch_data, workdir)
        eval_distributed = distributed_type(eval_launch_data)
        if eval_distributed == "NO" and world != 1:
            raise UserError(
                f"--eval-launch {eval_settings.launch} runs a single process but the job has "
                f"{world}; use launch/ddp.yaml."
            )
        eval_argv = (
            EVALUATE_RECIPE,
            *(("--config", eval_config) if eval_config else ()),
            f"--run_dir={output_dir}",
            f"--output_dir={output_dir / EVAL_DIR}",
        )
        _check_evaluation(eval_argv, eval_config, cfg, workdir, job_env)
        evaluate = dataclasses.replace(
            job,
            launch_config=str(eval_path),
            recipe_argv=eval_argv,
            max_requeues=0,
            is_deepspeed=eval_distributed == "DEEPSPEED",
        )
    return SubmissionPlan(
        settings=settings,
        folder=folder,
        train=job,
        evaluate=evaluate,
        output_dir=output_dir,
        warnings=warnings,
        resume_note=resume_note,
        prepare=prepare,
    )
