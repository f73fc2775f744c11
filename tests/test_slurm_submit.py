"""clustertune-submit without a cluster: settings, dry-run output, preflight errors, requeue logic."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from clustertune.errors import UserError
from clustertune.slurm import cli, requeue
from clustertune.slurm.env import NodeLaunch
from clustertune.slurm.job import LaunchJob, RequeueLimitReached, requeue_decision
from clustertune.slurm.settings import load_settings, parse_time_minutes
from clustertune.stop import EXIT_REQUEUE, launcher_preexec

RECIPE = ["recipes/finetune.py", "--config", "recipes/configs/smoke/lora.yaml"]


def submit(capsys, *args: str) -> tuple[int, str, str]:
    """Run clustertune-submit's main in this process; return (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_shipped_settings_load():
    for path in sorted((REPO / "slurm").glob("*.yaml")):
        settings = load_settings(str(path), {})
        assert settings.processes_per_node >= 1 and (REPO / settings.launch).is_file(), path
        assert yaml.safe_load(path.read_text()) and path.read_text().startswith("#"), path


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("1:30", 2),
        ("04:00:00", 240),
        ("1-00", 1440),
        ("2-03:30", 3090),
        ("0-00:00:59", 1),
        ("48:00:00", 2880),  # the first field has no upper bound
        ("1-23:59:59", 2880),
        ("2-3", 3060),
    ],
)
def test_slurm_time_formats(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99:99:99", "99 minutes is out of range (0-59 after hours)"),
        ("1-25:00:00", "25 hours is out of range (0-23 after days)"),
        ("10:60", "60 seconds is out of range (0-59 after minutes)"),
        ("1-2:60", "60 minutes is out of range (0-59 after hours)"),
        ("1:2:3:4", "is not a SLURM time"),
        ("1-", "is not a SLURM time"),
        ("-5", "is not a SLURM time"),
        (" 90", "is not a SLURM time"),
        ("0:00", "is zero"),
    ],
)
def test_slurm_times_out_of_range_or_format_are_refused(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_time_minutes(text)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("setup:\n  - 'module load cuda\n\n#SBATCH --exclusive'\n", "setup[0]="),
        ('env:\n  HF_HOME: "/data\\nrm -rf /"\n', "env['HF_HOME']="),
        ("env:\n  'BAD NAME': x\n", "env key 'BAD NAME' is not an environment variable name"),
        ('job_name: "a\\tb"\n', "job_name='a\\tb' holds the control character '\\t'"),
        ('sbatch_flags: ["--comment=a\\rb"]\n', "sbatch_flags[0]="),
    ],
)
def test_control_characters_in_yaml_values_are_refused(tmp_path, yaml_text, message):
    settings = tmp_path / "cluster.yaml"
    settings.write_text("processes_per_node: 2\n" + yaml_text)
    with pytest.raises(UserError, match=re.escape(message)):
        load_settings(str(settings), {})


def test_dry_run_prints_sbatch_files_and_per_node_commands(capsys, no_slurm, tmp_path):
    settings = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    (tmp_path / "cluster.yaml").write_text(
        yaml.safe_dump({**settings, "folder": str(tmp_path / "logs/%j")})
    )
    code, out, err = submit(
        capsys,
        "--config",
        str(tmp_path / "cluster.yaml"),
        "--nodes",
        "2",
        "--processes-per-node",
        "2",
        "--then",
        "evaluate",
        "--eval-config",
        "recipes/configs/smoke/evaluate.yaml",
        "--eval-launch",
        "launch/ddp.yaml",
        "--dry-run",
        "--",
        *RECIPE,
        "--train.micro_batch_size=4",
        f"--output_dir={tmp_path / 'run'}",
    )
    assert code == 0, err
    training, evaluation = out.split("# ---- sbatch file of the")[1:]
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=USR2@60",
        "#SBATCH --requeue",
        "#SBATCH --partition=debug",
        "#SBATCH --time=30",
        "export HF_HUB_OFFLINE=1",
        "-m submitit.core._submit",
        "%j_%t_log.out",
    ):
        assert line in training, line
    assert "--dependency" not in training
    node_command = training.split("runs ----\n")[1].splitlines()[0]
    assert "-m clustertune.launch --deepspeed_multinode_launcher standard" in node_command
    assert f"--config_file {REPO / 'launch/zero2.yaml'}" in node_command
    assert "--num_machines 2 --machine_rank $SLURM_NODEID" in node_command
    assert (
        "--num_processes 4 recipes/finetune.py --config recipes/configs/smoke/lora.yaml"
        in node_command
    )
    assert "<address of the first node of $SLURM_JOB_NODELIST>" in node_command
    assert "#SBATCH --dependency=afterok:TRAINING_JOB_ID" in evaluation
    assert "#SBATCH --kill-on-invalid-dep=yes" in evaluation
    eval_command = evaluation.split("runs ----\n")[1].splitlines()[0]
    assert (
        f"--config_file {REPO / 'launch/ddp.yaml'}" in eval_command
        and "deepspeed" not in eval_command
    )
    assert (
        f"recipes/evaluate.py --config recipes/configs/smoke/evaluate.yaml --run_dir={tmp_path / 'run'} "
        f"--output_dir={tmp_path / 'run' / 'eval'}"
    ) in eval_command
    assert "looks node-local" in err  # tmp_path is under /tmp: a warning, not an error
    assert f"--output={tmp_path}/logs/%j/%j_0_log.out" in training
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("launch", ["zero2", "fsdp2"])
def test_node_command_is_valid_accelerate_launch_arguments(launch):
    """DeepSpeed gets one launcher per node (not pdsh); FSDP, like DDP, goes through torchrun
    with the machine flags alone."""
    from accelerate.commands.launch import launch_command_parser

    job = LaunchJob(
        launch_config=str(REPO / f"launch/{launch}.yaml"),
        processes_per_node=2,
        recipe_argv=tuple(RECIPE),
        workdir=str(REPO),
        max_requeues=1,
        is_deepspeed=launch == "zero2",
    )
    node = NodeLaunch(
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=20007,
        num_processes=4,
    )
    command = job.command(node)
    assert command[:3] == [sys.executable, "-m", "clustertune.launch"]
    args = launch_command_parser().parse_args(command[3:])
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 4)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 20007)
    if launch == "zero2":
        assert args.deepspeed_multinode_launcher == "standard"
    else:
        assert not any("deepspeed" in arg for arg in command)
    assert args.training_script == "recipes/finetune.py" and args.training_script_args == RECIPE[1:]


FSDP2_LAUNCH = yaml.safe_load((REPO / "launch/fsdp2.yaml").read_text())


def dev_cluster_with(launch: Path) -> tuple[str, ...]:
    return ("--config", "slurm/dev-cluster.yaml", "--launch", str(launch))


@pytest.mark.parametrize(
    ("fsdp_config", "recipe_args", "message"),
    [
        (
            {"fsdp_version": 1},
            [],
            "fsdp_config.fsdp_version=1: clustertune runs FSDP2 (fully_shard, DTensor state "
            "dicts); set fsdp_version: 2 (launch/fsdp2.yaml)",
        ),
        (
            {"fsdp_state_dict_type": "FULL_STATE_DICT"},
            [],
            "fsdp_config.fsdp_state_dict_type=FULL_STATE_DICT: FSDP2 runs are checkpointed sharded",
        ),
        (
            {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
            [],
            "names LlamaDecoderLayer, which 't5' models do not have (their blocks: T5Block)",
        ),
        (
            {"mixed_precision": "bf16"},
            ["--model.dtype=fp32"],
            "the launch file's mixed_precision=bf16 contradicts model.dtype=fp32",
        ),
    ],
)
def test_fsdp_launch_file_is_refused_before_submitting_as_the_recipe_refuses_it(
    capsys, fake_slurm, tmp_path, fsdp_config, recipe_args, message
):
    """The line the recipe would print at start (fsdp.check_fsdp_settings; tests/test_fsdp2.py
    runs the recipe), after the launch file's name."""
    launch = {**FSDP2_LAUNCH, "fsdp_config": dict(FSDP2_LAUNCH["fsdp_config"])}
    for key, value in fsdp_config.items():
        (launch["fsdp_config"] if key.startswith("fsdp_") else launch)[key] = value
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(launch))
    code, out, err = submit(capsys, *dev_cluster_with(path), "--", *RECIPE, *recipe_args)
    assert code == 2, (out, err)
    assert err.startswith(f"clustertune: error: {path}: ") and len(err.strip().splitlines()) == 1
    assert message in err
    assert not fake_slurm["calls"].exists()  # no scontrol, let alone sbatch


def test_fsdp_mixed_precision_with_dtype_auto_is_left_to_the_node(capsys, no_slurm, tmp_path):
    """model.dtype=auto becomes bf16 or fp32 on the node, so only the job can compare them."""
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump({**FSDP2_LAUNCH, "mixed_precision": "bf16"}))
    recipe = [*RECIPE, "--model.dtype=auto", f"--output_dir={tmp_path / 'run'}"]
    code, out, err = submit(capsys, *dev_cluster_with(path), "--dry-run", "--", *recipe)
    assert code == 0, err
    node_command = out.split("runs ----\n")[1].splitlines()[0]
    assert f"--config_file {path}" in node_command and "deepspeed" not in node_command


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--partition", "gpus"],
            "partition 'gpus' does not exist on this cluster; available: debug, gpu",
        ),
        (
            ["--launch", "launch/single_gpu.yaml"],
            "launch/single_gpu.yaml runs a single process (distributed_type: NO) "
            "but nodes x processes_per_node = 1 x 2 = 2",
        ),
        (
            ["--nodes", "2", "--gpus-per-node", "2", "--processes-per-node", "4"],
            "processes_per_node=4 is more than gpus_per_node=2",
        ),
        (
            ["--processes-per-node", "3"],
            "train.global_batch_size=16 is not divisible by micro_batch_size=8 x world_size=3",
        ),
        (
            ["--launch", "launch/zero9.yaml"],
            "launch file 'launch/zero9.yaml' does not exist; use one of: launch/ddp.yaml",
        ),
        (["--time", "4h"], "time='4h' is not a SLURM time"),
        (["--time", "1"], "signal_delay_s=60 must be at least 30 and less than time='1' (60 s)"),
        (["--time", "99:99:99"], "99 minutes is out of range (0-59 after hours)"),
        (["--time", "1-25:00:00"], "25 hours is out of range (0-23 after days)"),
        (
            ["--partition", "debug\n#SBATCH --exclusive"],
            "partition='debug\\n#SBATCH --exclusive' holds the control character '\\n'",
        ),
        (["--account", "a\x1b[2Jb"], "account='a\\x1b[2Jb' holds the control character"),
        (
            ["--gpus-per-node", "-1"],
            "gpus_per_node=-1 is negative; use 0 for CPU-only nodes, else the GPUs of each node",
        ),
        (["--nodes", "-2"], "nodes=-2 is negative; use at least 1 (--nodes)"),
        (["--max-requeues", "-1"], "max_requeues=-1 is negative; use 0 for none"),
    ],
)
def test_preflight_errors_submit_nothing(capsys, fake_slurm, args, message):
    code, out, err = submit(capsys, "--config", "slurm/dev-cluster.yaml", *args, "--", *RECIPE)
    assert code == 2, (out, err)
    assert err.startswith("clustertune: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not fake_slurm["calls"].exists()  # no scontrol, let alone sbatch


def test_recipe_and_inputs_are_checked(capsys, fake_slurm, tmp_path, monkeypatch):
    def error(*args: str, config: str = "slurm/dev-cluster.yaml") -> str:
        code, _, err = submit(capsys, "--config", config, "--", *args)
        assert code == 2, err
        return err

    assert "recipe 'recipes/finetun.py' does not exist" in error(
        "recipes/finetun.py", "--config", "x.yaml"
    )
    assert "no recipe given" in error()
    assert "unknown config key 'train.max_step'" in error(*RECIPE, "--train.max_step=3")
    assert "model.name_or_path './no-such-model' does not exist" in error(
        *RECIPE, "--model.name_or_path=./no-such-model"
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert "model 'google/flan-t5-small' is not in the Hugging Face cache" in error(
        *RECIPE, "--model.name_or_path=google/flan-t5-small"
    )  # HF_HUB_OFFLINE=1 in the YAML
    (tmp_path / "hf/hub/models--google--flan-t5-small/snapshots").mkdir(parents=True)
    code, out, err = submit(
        capsys,
        "--config",
        "slurm/dev-cluster.yaml",
        "--dry-run",
        "--",
        *RECIPE,
        "--model.name_or_path=google/flan-t5-small",
    )
    assert code == 0, err
    settings = tmp_path / "s.yaml"
    settings.write_text("partition: debug\nnode: 2\n")
    assert "unknown SLURM setting 'node' in" in error(*RECIPE, config=str(settings))
    assert "did you mean 'nodes'?" in error(*RECIPE, config=str(settings))
    settings.write_text("time: 4:00:00\nprocesses_per_node: 2\n")  # YAML: the number 14400
    assert "must be a quoted string like '04:00:00'" in error(*RECIPE, config=str(settings))
    settings.write_text("gpus_per_node: 0\n")
    assert "set processes_per_node" in error(*RECIPE, config=str(settings))


def test_dry_run_without_a_recipe_separator_is_an_error(capsys, no_slurm):
    code, _, err = submit(capsys, "--config", "slurm/dev-cluster.yaml", "--dry-run")
    assert code == 2 and "end the options with --" in err


def stopped_job(max_requeues: int) -> LaunchJob:
    return LaunchJob(
        launch_config="launch/ddp.yaml",
        processes_per_node=1,
        recipe_argv=("x.py",),
        workdir=str(REPO),
        max_requeues=max_requeues,
    )


def test_node_zero_requeues_a_running_job_after_the_checkpoint(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with pytest.raises(SystemExit) as stopped:
        stopped_job(2)._after_stop(machine_rank=0, restarts=1, received=[signal.SIGUSR2])
    assert stopped.value.code == EXIT_REQUEUE
    assert fake_slurm["calls"].read_text().splitlines() == ["show job --oneliner 41", "requeue 41"]


def test_other_nodes_leave_the_requeue_to_node_zero(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with pytest.raises(SystemExit):
        stopped_job(2)._after_stop(machine_rank=1, restarts=0, received=[signal.SIGUSR2])
    assert not fake_slurm["calls"].exists()


def test_a_job_slurm_is_ending_is_not_requeued(fake_slurm, monkeypatch):
    """scancel makes the job COMPLETING; `scontrol requeue` would bring a cancelled job back."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    fake_slurm["state"].write_text("COMPLETING")
    with pytest.raises(SystemExit):
        stopped_job(2)._after_stop(machine_rank=0, restarts=0, received=[signal.SIGTERM])
    assert "requeue" not in fake_slurm["calls"].read_text()


def test_requeue_limit_is_respected(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with pytest.raises(
        RequeueLimitReached, match=r"requeued 2 times already \(max_requeues=2\); submit the same"
    ):
        stopped_job(2)._after_stop(machine_rank=0, restarts=2, received=[signal.SIGUSR2])
    assert "requeue" not in fake_slurm["calls"].read_text()


def test_launcher_starts_with_usr1_usr2_ignored():
    """So torchrun, which clustertune-launch starts first, survives SLURM's step-wide signal."""
    probe = "import signal as s; print([s.getsignal(n) == s.SIG_IGN for n in (s.SIGUSR1, s.SIGUSR2, s.SIGTERM)])"
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=launcher_preexec,
    ).stdout
    assert shown.strip() == "[True, True, False]"


def test_settings_errors_are_user_errors():
    with pytest.raises(UserError, match="sbatch_flags entry '-N2' must be a long option"):
        load_settings(None, {"processes_per_node": 1, "sbatch_flags": ["-N2"]})


@pytest.mark.parametrize(
    ("state", "restarts", "rank", "action"),
    [
        ("RUNNING", 0, 0, "requeue"),
        ("RUNNING", 2, 0, "stop_at_limit"),
        ("COMPLETING", 0, 0, "let_slurm_end_it"),
        ("UNKNOWN", 0, 0, "let_slurm_end_it"),
        (None, 0, 1, "leave_to_node_0"),
    ],
)
def test_requeue_decision(state, restarts, rank, action):
    assert requeue_decision(state, restarts, 2, rank, "41").action == action


def test_train_sbatch_requeue_step_follows_the_same_rule(fake_slurm, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue.main(["--max-requeues", "1"]) == 1  # at the limit: no requeue
    assert "requeued 1 times already (max_requeues=1)" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert requeue.main(["--max-requeues", "1"]) == 0
    calls = fake_slurm["calls"].read_text().splitlines()
    assert calls == ["show job --oneliner 41", "show job --oneliner 41", "requeue 41"]


def test_every_scalar_setting_has_a_flag_with_its_comment_as_help():
    flags = {name: help_text for name, _, help_text in cli.settings_flags()}
    assert {"nodes", "gpus_per_node", "processes_per_node", "partition", "time", "launch"} <= set(
        flags
    )
    assert not {"sbatch_flags", "setup", "env"} & set(flags)  # lists and mappings: YAML only
    assert all(flags.values()), flags
    args, _ = cli.parse_command_line(["--processes-per-node", "3", "--mem-gb", "1.5", "--", "x"])
    assert (args.processes_per_node, args.mem_gb, args.nodes) == (3, 1.5, None)
