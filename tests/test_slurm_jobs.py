"""clustertune-submit against the real local SLURM cluster (2 CPU nodes, n1 and n2, on this host).

The smoke LoRA fine-tune on 1 node x 2 processes (ZeRO-2) and on 2 nodes x 1 process (ZeRO-2
across SLURM nodes, then the evaluation with afterok), a job preempted by the time-limit signal
that requeues itself and ends on the same losses as an uninterrupted run, and bad input refused
before anything is submitted. Wall times and the requeue gap are printed (pytest -s), not asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import REPO, describe, recipe_env, train_losses

from clustertune.slurm.job import job_fields
from clustertune.slurm.submit import TERMINAL_STATES

pytestmark = pytest.mark.slurm

MAX_STEPS = 12
EXACT = 1e-6  # fp32 on CPU: a resumed run and an uninterrupted one agree to this
JOB_TIMEOUT_S = 900  # generous: a loaded 2-core machine; typical jobs take 1-2 minutes


def smoke_args(assets, output_dir: Path, **overrides) -> list[str]:
    """12 steps of the smoke LoRA run: global batch 8 = 2 ranks x micro 2 x accum 2."""
    values = {
        "model.name_or_path": assets["tiny_t5"],
        "data.train_file": assets["train"],
        "data.eval_file": assets["validation"],
        "data.max_eval_examples": 16,
        "output_dir": output_dir,
        "train.max_steps": MAX_STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.learning_rate": 1e-3,
        "train.warmup_steps": 2,
        "train.log_every_steps": 1,
        "train.eval_every_steps": 0,
        "checkpoint.every_steps": 0,
    }
    values.update(overrides)
    return [
        "recipes/finetune.py",
        "--config",
        "recipes/configs/smoke/lora.yaml",
        *(f"--{key}={value}" for key, value in values.items()),
    ]


def cluster_settings(folder: Path) -> Path:
    """slurm/dev-cluster.yaml with its submitit folder in `folder`, fresh (a new cluster
    restarts job ids at 1); the settings file is written there too."""
    values = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump({**values, "folder": str(folder / "%j")}))
    return path


@pytest.fixture(scope="module")
def settings(slurm_cluster: Path, tmp_path_factory) -> Path:
    return cluster_settings(tmp_path_factory.mktemp("submitit"))


def submit(
    settings: Path, recipe: list[str], *flags: str, timeout: float = JOB_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "slurm/submit.py", "--config", str(settings), *flags, "--", *recipe],
        cwd=REPO,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_ids(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"^submitted job (\d+)", result.stdout, flags=re.M)


def log(settings: Path, job_id: str, node: int, stream: str = "out") -> str:
    folder = Path(yaml.safe_load(settings.read_text())["folder"].replace("%j", job_id))
    path = folder / f"{job_id}_{node}_log.{stream}"
    return path.read_text(errors="replace") if path.exists() else ""


def submitter_lines(text: str) -> list[tuple[float, str]]:
    """(time, message) of the `clustertune-submit [stamp] message` lines of a job's log."""
    found = re.findall(r"^clustertune-submit \[([\d-]+ [\d:.]+)\] (.*)$", text, flags=re.M)
    return [
        (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp(), message)
        for stamp, message in found
    ]


_BASELINE: dict[str, object] = {}


@pytest.fixture(scope="module")
def baseline(settings: Path, smoke_assets, tmp_path_factory) -> dict[str, object]:
    """1 node x 2 processes, ZeRO-2, submitted with --wait: the uninterrupted reference run."""
    if not _BASELINE:
        out = tmp_path_factory.mktemp("slurm-runs") / "baseline"
        began = time.monotonic()
        result = submit(
            settings,
            smoke_args(smoke_assets, out),
            "--launch",
            "launch/zero2.yaml",
            "--nodes",
            "1",
            "--processes-per-node",
            "2",
            "--wait",
        )
        _BASELINE.update(result=result, out=out, wall_s=time.monotonic() - began)
    return _BASELINE


def test_one_node_two_processes_zero2(baseline, settings, smoke_assets):
    result, out = baseline["result"], baseline["out"]
    assert result.returncode == 0, describe(result)
    print(
        f"\n1 node x 2 processes, ZeRO-2, {MAX_STEPS} steps: {baseline['wall_s']:.0f} s from submission to the end"
    )
    (job_id,) = job_ids(result)
    assert re.search(
        rf"job {job_id} \(training\): COMPLETED, exit 0:0, requeued 0 time", result.stdout
    ), result.stdout
    assert (
        f"tail -F {Path(yaml.safe_load(settings.read_text())['folder'].replace('%j', job_id))}"
        in result.stdout
    )
    assert "ZeRO-2" in log(settings, job_id, 0)
    assert sorted(train_losses(out)) == list(range(1, MAX_STEPS + 1))

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"]), str(out / "final")
    )
    assert any(
        "lora_B" in name and float(p.abs().max()) > 0 for name, p in model.named_parameters()
    )


def test_two_nodes_one_process_each_then_evaluate(settings, smoke_assets, tmp_path):
    """World size 2 across the two SLURM nodes (ZeRO-2, rendezvous on n1), then ROUGE with afterok."""
    out = tmp_path / "two-nodes"
    began = time.monotonic()
    result = submit(
        settings,
        smoke_args(smoke_assets, out, **{"checkpoint.every_steps": 6}),
        "--nodes",
        "2",
        "--processes-per-node",
        "1",
        "--launch",
        "launch/zero2.yaml",
        "--then",
        "evaluate",
        "--eval-config",
        "recipes/configs/smoke/evaluate.yaml",
        "--eval-launch",
        "launch/ddp.yaml",
        "--wait",
    )
    print(
        f"\n2 nodes x 1 process then evaluation (2 x 1, DDP): {time.monotonic() - began:.0f} s in all"
    )
    assert result.returncode == 0, describe(result)
    train_id, eval_id = job_ids(result)
    assert f"job {eval_id} (evaluation (after job {train_id} succeeds)): COMPLETED" in result.stdout
    nodes = [log(settings, train_id, node, "err") for node in (0, 1)]
    assert (
        "on node n1 (machine_rank 0 of 2)" in nodes[0]
        and "on node n2 (machine_rank 1 of 2)" in nodes[1]
    )
    assert all("--num_machines 2" in text and "--num_processes 2" in text for text in nodes)
    assert "ZeRO-2" in log(settings, train_id, 0)
    state = json.loads((out / "checkpoints/step_6/trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(train_losses(out)) == list(range(1, MAX_STEPS + 1))
    rouge = json.loads((out / "eval/rouge.json").read_text())
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= rouge.keys()
    print(f"evaluation: rouge1 {rouge['rouge1']}, rougeL {rouge['rougeL']}")


def wait_until_ended(job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(job_id) or {}
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(
    baseline, settings, smoke_assets, tmp_path
):
    """USR2 to the job as SLURM sends it before the time limit (every process of the step):
    all ranks save together, node 0 requeues, the rerun resumes and ends on the baseline's losses."""
    assert baseline["result"].returncode == 0, describe(baseline["result"])
    out = tmp_path / "preempted"
    began = time.monotonic()
    result = submit(
        settings,
        smoke_args(smoke_assets, out),
        "--launch",
        "launch/zero2.yaml",
        "--nodes",
        "1",
        "--processes-per-node",
        "2",
        timeout=120,
    )
    assert result.returncode == 0, describe(result)
    (job_id,) = job_ids(result)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and train_losses(out) and max(train_losses(out)) >= 2):
        assert (
            time.monotonic() < deadline
            and (job_fields(job_id) or {}).get("JobState") not in TERMINAL_STATES
        )
        time.sleep(0.1)
    signalled_at = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what --signal=USR2@T does
    fields = wait_until_ended(job_id)
    wall_s = time.monotonic() - began
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", fields

    text = log(settings, job_id, 0, "err")
    events = submitter_lines(text)
    requeued_at = next(
        t for t, message in events if message.startswith("checkpoint saved and stopped (SIGUSR2")
    )
    restarted_at = next(
        t for t, message in events if re.match(rf"job {job_id} run 2 \(requeued 1 of", message)
    )
    stopped_step = int(re.search(r"stopped by SIGUSR2 at step (\d+)", text).group(1))
    output = log(settings, job_id, 0)
    assert re.search(
        rf"resumed from .*step_{stopped_step} at step {stopped_step} of {MAX_STEPS}", output
    ), output
    assert 2 <= stopped_step < MAX_STEPS

    resumed, uninterrupted = train_losses(out), train_losses(baseline["out"])
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(resumed[step] - uninterrupted[step]) for step in resumed)
    assert worst <= EXACT, (resumed, uninterrupted)
    print(
        f"\npreempted at step {stopped_step}: signal -> checkpoint saved and requeued "
        f"{requeued_at - signalled_at:.1f} s, requeue -> run 2 started {restarted_at - requeued_at:.1f} s; "
        f"job wall {wall_s:.0f} s (uninterrupted {baseline['wall_s']:.0f} s); "
        f"final loss {resumed[MAX_STEPS]:.6f} vs {uninterrupted[MAX_STEPS]:.6f}, max step difference {worst:.1e}"
    )


def squeue_ids() -> set[str]:
    return set(
        subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True
        ).stdout.split()
    )


@pytest.mark.parametrize(
    ("flags", "recipe_path", "message"),
    [
        (
            ["--partition", "gpu"],
            "recipes/finetune.py",
            "partition 'gpu' does not exist on this cluster; available: debug",
        ),
        (
            ["--launch", "launch/single_gpu.yaml"],
            "recipes/finetune.py",
            "runs a single process (distributed_type: NO) "
            "but nodes x processes_per_node = 1 x 2 = 2",
        ),
        (
            ["--nodes", "2", "--gpus-per-node", "1"],
            "recipes/finetune.py",
            "processes_per_node=2 is more than gpus_per_node=1",
        ),
        ([], "recipes/finetune_missing.py", "recipe 'recipes/finetune_missing.py' does not exist"),
    ],
)
def test_bad_input_is_refused_before_submitting(
    settings, smoke_assets, tmp_path, flags, recipe_path, message
):
    before = squeue_ids()
    recipe = smoke_args(smoke_assets, tmp_path / "never")
    result = submit(settings, [recipe_path, *recipe[1:]], *flags, timeout=120)
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("clustertune: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "submitted job" not in result.stdout and squeue_ids() == before


def sbatch(script: str, *args: str, output: Path, nodes: int = 1, **env: str) -> str:
    """Submit one of the plain sbatch templates as a CPU job of the dev cluster; its job id."""
    submitted = subprocess.run(
        [
            *("sbatch", "--parsable", "--partition=debug", f"--nodes={nodes}"),
            *("--gpus-per-node=0", "--cpus-per-task=2", "--time=00:30:00", f"--output={output}"),
            script,
            *args,
        ],
        cwd=REPO,
        env=recipe_env(PYTHON=sys.executable, **env),
        capture_output=True,
        text=True,
        check=True,
    )
    return submitted.stdout.strip().split(";")[0]


def test_train_sbatch_requeues_itself_and_evaluate_sbatch_follows(
    baseline, slurm_cluster, smoke_assets, tmp_path
):
    """slurm/train.sbatch without submitit: USR1 to the batch shell (what --signal=B:USR1@T
    does) stops every rank with a checkpoint, the script requeues the job (clustertune.slurm.
    requeue) and the rerun ends on the baseline's losses; then slurm/evaluate.sbatch scores the
    run on 2 nodes x 1 process (clustertune.slurm.node on each node)."""
    assert baseline["result"].returncode == 0, describe(baseline["result"])
    out, train_log = tmp_path / "sbatch-run", tmp_path / "train.out"
    job_id = sbatch(
        "slurm/train.sbatch",
        *smoke_args(smoke_assets, out),
        output=train_log,
        LAUNCH="launch/zero2.yaml",
        PROCESSES_PER_NODE="2",
        MAX_REQUEUES="1",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (out / "metrics.jsonl").exists() or max(train_losses(out) or [0]) < 2:
        assert time.monotonic() < deadline, train_log.read_text(errors="replace")
        state = (job_fields(job_id) or {}).get("JobState")
        assert state not in TERMINAL_STATES, train_log.read_text(errors="replace")
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    fields = wait_until_ended(job_id)
    text = train_log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, text)
    assert "-m clustertune.launch --deepspeed_multinode_launcher standard" in text, text
    assert re.search(rf"checkpoint saved and stopped; requeued job {job_id} \(requeue 1 of", text)
    resumed, uninterrupted = train_losses(out), train_losses(baseline["out"])
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert max(abs(resumed[step] - uninterrupted[step]) for step in resumed) <= EXACT

    eval_log = tmp_path / "eval.out"
    eval_id = sbatch(
        "slurm/evaluate.sbatch",
        *("--config", "recipes/configs/smoke/evaluate.yaml"),
        *(f"--run_dir={out}", f"--output_dir={out / 'eval'}"),
        output=eval_log,
        nodes=2,
        PROCESSES_PER_NODE="1",
    )
    fields = wait_until_ended(eval_id)
    assert fields["JobState"] == "COMPLETED", (fields, eval_log.read_text(errors="replace"))
    assert "--num_machines 2" in eval_log.read_text(errors="replace")
    rouge = json.loads((out / "eval/rouge.json").read_text())
    assert {"rouge1", "rougeL"} <= rouge.keys()
