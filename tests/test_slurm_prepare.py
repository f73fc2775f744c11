"""clustertune-submit --prepare-shards N: a SLURM array of N `clustertune-data prepare --shard
i/N` tasks, then the training (afterok on the whole array), then the evaluation.

Without a cluster: the dry run shows the chain (the array's sbatch file and per-task command,
then the training and evaluation with their dependencies), the array's tasks take the
training's environment but neither its GPUs nor its node-sized requests, and every mistake is
one line before anything is submitted. On the real local cluster: a prepare array of 2 ->
training -> evaluation, all completing, the training reading the prepared data and preparing
no shard itself, SLURM starting each job only after the ones it depends on ended.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import REPO, describe
from test_slurm_jobs import job_ids, log, submit
from test_slurm_preflight_errors import one_line_error
from test_slurm_submit import RECIPE
from test_slurm_submit import submit as submit_here

from clustertune.slurm.job import job_fields

EVAL_CONFIG = ["--eval-config", "recipes/configs/smoke/evaluate.yaml"]


def sections(out: str) -> dict[str, str]:
    """The dry run's parts by title: 'prepare array', 'training job', 'evaluation job'."""
    found = re.split(r"^# ---- sbatch file of the (.+?) [(](?:.*)$", out, flags=re.M)
    return {
        " ".join(title.split()[:2]): body
        for title, body in zip(found[1::2], found[2::2], strict=True)
    }


def setup_lines(sbatch: str) -> str:
    return sbatch.split("# setup\n")[1].split("\n\n")[0]


def test_dry_run_shows_the_prepare_array_then_training_then_evaluation(capsys, no_slurm, tmp_path):
    values = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    settings = tmp_path / "cluster.yaml"
    settings.write_text(yaml.safe_dump({**values, "folder": str(tmp_path / "logs/%j")}))
    prepared = tmp_path / "prepared"
    code, out, err = submit_here(
        capsys,
        *("--config", str(settings), "--prepare-shards", "2", "--then", "evaluate", *EVAL_CONFIG),
        "--dry-run",
        "--",
        *RECIPE,
        "--train.max_steps=5",
        f"--data.prepared_dir={prepared}",
    )
    assert code == 0, err
    assert out.index("prepare array") < out.index("training job") < out.index("evaluation job")
    assert (
        f"prepare: array of 2 CPU task(s) (task i: --shard i/2, --num_proc 2) -> {prepared} "
        "(4 shard(s): none present yet)"
    ) in out
    parts = sections(out)
    array, training, evaluation = (
        parts[k] for k in ("prepare array", "training job", "evaluation job")
    )
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --job-name=clustertune-dev-prepare",
        "#SBATCH --partition=debug",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@60",
        f"#SBATCH --output={tmp_path}/logs/%A_%a/%A_%a_0_log.out",
    ):
        assert line in array, line
    assert "--gpus" not in array and "--dependency" not in array
    # the same environment as the training: both resolve the same data.prepared_dir
    assert setup_lines(array) == setup_lines(training)
    assert "export HF_HUB_OFFLINE=1" in setup_lines(array)
    task_command = array.split("runs (task i: --shard i/2) ----\n")[1].splitlines()[0]
    assert task_command.endswith(
        "-m clustertune.data_cli prepare --config recipes/configs/smoke/lora.yaml "
        f"--train.max_steps=5 --data.prepared_dir={prepared} "
        "--shard $SLURM_ARRAY_TASK_ID/2 --num_proc 2"
    ), task_command
    assert "#SBATCH --dependency=afterok:PREPARE_ARRAY_JOB_ID" in training
    assert "#SBATCH --kill-on-invalid-dep=yes" in training  # a failed task cancels the training
    assert "recipes/finetune.py --config recipes/configs/smoke/lora.yaml" in training
    assert "#SBATCH --dependency=afterok:TRAINING_JOB_ID" in evaluation
    assert f"data.prepared_dir {prepared} looks node-local" in err  # /tmp: a warning
    assert not prepared.exists() and not (tmp_path / "logs").exists()  # nothing written


def test_prepare_tasks_take_cpus_not_the_training_nodes(capsys, no_slurm, tmp_path):
    """On a GPU cluster's settings: no GPUs, memory, constraint or --exclusive for the CPU tasks,
    their own CPUs and partition; the training keeps its own."""
    code, out, err = submit_here(
        capsys,
        *("--config", "slurm/cluster.yaml", "--constraint", "a100"),
        *("--prepare-shards", "3", "--prepare-cpus-per-task", "16", "--prepare-partition", "cpu"),
        "--dry-run",
        "--",
        *RECIPE,
        "--train.micro_batch_size=2",  # global 16 = 8 GPUs x micro 2
        f"--data.prepared_dir={tmp_path / 'prepared'}",
    )
    assert code == 0, err
    parts = sections(out)
    array, training = parts["prepare array"], parts["training job"]
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --cpus-per-task=16", "#SBATCH --partition=cpu"):
        assert line in array, line
    for option in ("--gpus", "--mem", "--constraint", "--exclusive"):
        assert option not in array and option in training, option
    assert "--shard $SLURM_ARRAY_TASK_ID/3 --num_proc 16" in array
    assert "#SBATCH --partition=gpu" in training and "#SBATCH --cpus-per-task=64" in training
    assert setup_lines(array) == setup_lines(training)  # module load, venv, env: the same


def test_one_prepare_task_is_a_plain_job_with_its_shard(capsys, no_slurm, tmp_path):
    code, out, err = submit_here(
        capsys, "--config", "slurm/dev-cluster.yaml", "--prepare-shards", "1", "--dry-run",
        "--", *RECIPE, f"--data.prepared_dir={tmp_path / 'prepared'}",
    )  # fmt: skip
    assert code == 0, err
    array = sections(out)["prepare array"]
    assert "--array" not in array and "--shard 0/1 --num_proc 2" in array


@pytest.fixture
def prepared_half(tmp_path, monkeypatch, capsys) -> Path:
    """Shard 0 of 2 of the smoke LoRA data, prepared as an array task that finished would
    leave it (shard 1 missing, as after a cancelled task)."""
    from clustertune import data_cli

    monkeypatch.chdir(REPO)
    folder = tmp_path / "prepared"
    config = [*RECIPE[1:], f"--data.prepared_dir={folder}"]
    assert data_cli.main(["prepare", *config, "--shard", "0/2"]) == 0
    capsys.readouterr()  # what preparing printed is not what the test reads
    return folder


@pytest.mark.parametrize(
    ("flags", "recipe", "message"),
    [
        (["--prepare-shards", "0"], RECIPE, "--prepare-shards 0: give at least 1 array task"),
        (
            ["--prepare-shards", "2", "--then", "evaluate", *EVAL_CONFIG],
            ["recipes/evaluate.py", "--config", "recipes/configs/smoke/evaluate.yaml"],
            "--prepare-shards prepares the training data of recipes/finetune.py, not of "
            "'recipes/evaluate.py'; drop --prepare-shards",
        ),
        (
            ["--prepare-shards", "2"],
            [*RECIPE, "--data.format=chat"],  # T5: what `clustertune-data prepare` refuses
            "data.format: chat conversations need a decoder-only model, and this one is seq2seq",
        ),
        (
            ["--prepare-cpus-per-task", "4"],
            RECIPE,
            "--prepare-cpus-per-task sets the prepare array's tasks, which only "
            "--prepare-shards N submits; add --prepare-shards N, or drop --prepare-cpus-per-task",
        ),
        (
            ["--prepare-shards", "2", "--prepare-partition", "gpus"],
            RECIPE,
            "prepare_partition 'gpus' does not exist on this cluster; available: debug, gpu",
        ),
        (
            ["--prepare-shards", "2", "--prepare-cpus-per-task", "-1"],
            RECIPE,
            "prepare_cpus_per_task=-1 is negative; use at least 1, or leave it unset",
        ),
    ],
    ids=["count", "recipe", "data", "flag without the array", "partition", "cpus"],
)
def test_prepare_mistakes_are_one_line_before_submitting(
    capsys, fake_slurm, tmp_path, flags, recipe, message
):
    recipe = [*recipe, f"--data.prepared_dir={tmp_path / 'prepared'}"]
    code, out, err = submit_here(
        capsys, "--config", "slurm/dev-cluster.yaml", *flags, "--", *recipe
    )
    assert message in one_line_error(code, out, err)
    assert not fake_slurm["calls"].exists()  # no scontrol, let alone sbatch


def test_a_prepared_set_the_array_would_refuse_is_refused_before_submitting(
    capsys, fake_slurm, prepared_half
):
    before = sorted(str(p) for p in prepared_half.rglob("*"))

    def refused(count: str, *overrides: str) -> str:
        code, out, err = submit_here(
            capsys, "--config", "slurm/dev-cluster.yaml", "--prepare-shards", count,
            "--", *RECIPE, f"--data.prepared_dir={prepared_half}", *overrides,
        )  # fmt: skip
        return one_line_error(code, out, err)

    assert (
        f"--prepare-shards 3: '{prepared_half}' is prepared in 2 shards already; use "
        "--prepare-shards 2, or another data.prepared_dir"
    ) in refused("3")
    assert (
        f"data.prepared_dir '{prepared_half}' holds data prepared with other settings "
        "(data.max_target_length: 64 -> 32)"
    ) in refused("2", "--data.max_target_length=32")
    assert sorted(str(p) for p in prepared_half.rglob("*")) == before  # nothing written
    assert not fake_slurm["calls"].exists()


def test_a_resubmission_keeps_the_finished_shards(capsys, no_slurm, prepared_half):
    """After a cancelled task: the same command again plans the missing shards only (each
    task keeps what is there), and a complete set is a warning, not an error."""
    from clustertune import data_cli

    config = [*RECIPE[1:], f"--data.prepared_dir={prepared_half}"]

    def dry_run() -> tuple[str, str]:
        code, out, err = submit_here(
            capsys, "--config", "slurm/dev-cluster.yaml", "--prepare-shards", "2", "--dry-run",
            "--", RECIPE[0], *config,
        )  # fmt: skip
        assert code == 0, err
        return out, err

    out, err = dry_run()
    assert f"-> {prepared_half} (4 shard(s): 2 of 4 present, kept)" in out
    assert "complete already" not in err
    assert data_cli.main(["prepare", *config, "--shard", "1/2"]) == 0
    out, err = dry_run()
    assert f"-> {prepared_half} (4 shard(s): 4 of 4 present, kept)" in out
    assert f"the prepared data in {prepared_half} is complete already: the 2 prepare" in err


# --------------------------------------------------------------------- on the local cluster


def slurm_time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


@pytest.mark.slurm
def test_prepare_array_then_training_then_evaluation(slurm_cluster, smoke_assets, tmp_path):
    """Prepare array of 2 -> 3 LoRA steps on 1 process -> ROUGE, on the real cluster. The
    settings' env points $CLUSTERTUNE_CACHE into tmp_path, so the default data.prepared_dir
    (keyed by the data's fingerprint) is only shared if that env reaches the array's tasks as
    it reaches the training."""
    values = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    cache = tmp_path / "cache"
    values["env"]["CLUSTERTUNE_CACHE"] = str(cache)
    values["folder"] = str(tmp_path / "logs" / "%j")
    settings = tmp_path / "cluster.yaml"
    settings.write_text(yaml.safe_dump(values))
    eval_config = tmp_path / "evaluate.yaml"
    evaluation = yaml.safe_load((REPO / "recipes/configs/smoke/evaluate.yaml").read_text())
    evaluation["data"]["max_examples"] = 16
    evaluation["generation"]["max_new_tokens"] = 16
    eval_config.write_text(yaml.safe_dump(evaluation))
    out = tmp_path / "run"
    recipe = [
        *("recipes/finetune.py", "--config", "recipes/configs/smoke/lora.yaml"),
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--data.eval_file={smoke_assets['validation']}",
        "--data.max_eval_examples=16",
        f"--output_dir={out}",
        *("--train.max_steps=3", "--train.global_batch_size=4", "--train.micro_batch_size=4"),
        *("--train.eval_every_steps=0", "--checkpoint.every_steps=0"),
    ]
    began = time.monotonic()
    result = submit(
        settings,
        recipe,
        *("--prepare-shards", "2", "--launch", "launch/ddp.yaml", "--processes-per-node", "1"),
        *("--then", "evaluate", "--eval-config", str(eval_config), "--wait"),
    )
    wall_s = time.monotonic() - began
    print(f"\nprepare array of 2 -> training -> evaluation: {wall_s:.0f} s from submission")
    assert result.returncode == 0, describe(result)
    array_id, train_id, eval_id = job_ids(result)
    tasks = [f"{array_id}_0", f"{array_id}_1"]
    prepared = re.search(r"^prepare: array of 2 CPU task\(s\) .* -> (\S+) ", result.stdout, re.M)
    assert prepared and Path(prepared.group(1)).parent == cache / "prepared", result.stdout
    prepared_dir = prepared.group(1)
    for job_id, title in (
        (tasks[0], "prepare shard 1 of 2"),
        (tasks[1], "prepare shard 2 of 2"),
        (train_id, f"training (after array {array_id} succeeds)"),
        (eval_id, f"evaluation (after job {train_id} succeeds)"),
    ):
        assert f"job {job_id} ({title}): COMPLETED, exit 0:0" in result.stdout, result.stdout

    folder = tmp_path / "logs"
    for index, task in enumerate(tasks):
        output = (folder / task / f"{task}_0_log.out").read_text()
        for split in ("train", "eval"):
            assert f"prepared data/{split} shard {index + 1} of 2: " in output, output
        assert f"prepared data in {prepared_dir} (" in output
        assert (
            f"prepare task {task} run 1 on node"
            in (folder / task / f"{task}_0_log.err").read_text()
        )
    training = log(settings, train_id, 0)
    assert f"prepared data: {prepared_dir} (2,000 training examples, read memory-mapped" in training
    assert not re.search(r"^prepared \S+/\S+ shard", training, re.M), training  # none made here
    assert (out / "final").is_dir() and (out / "eval/rouge.json").is_file()

    # what was submitted, and what SLURM did with it
    submission = (folder / train_id / f"{train_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array_id}\n" in submission
    assert "#SBATCH --kill-on-invalid-dep=yes" in submission
    eval_submission = (folder / eval_id / f"{eval_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{train_id}\n" in eval_submission
    shown = {job_id: job_fields(job_id) for job_id in (*tasks, train_id, eval_id)}
    prepared_by = max(slurm_time(shown[task]["EndTime"]) for task in tasks)
    assert slurm_time(shown[train_id]["StartTime"]) >= prepared_by, shown
    assert slurm_time(shown[eval_id]["StartTime"]) >= slurm_time(shown[train_id]["EndTime"])
    assert {shown[task]["ArrayJobId"] for task in tasks} == {array_id}
