"""The FSDP2 launch file through clustertune-submit on the real local SLURM cluster (2 CPU nodes).

One chain of jobs on the smoke LoRA run (12 steps, dropout 0), each checked as it ends:
- 2 nodes x 1 process (rendezvous on n1) stopped by the time-limit signal: every rank writes
  its torch.distributed.checkpoint shard, node 0 requeues the job, the requeued job resumes;
  stopped again, it is at its requeue limit and ends;
- the same command on 1 node x 1 process: --dry-run says DCP reshards 2 -> 1, the job resumes
  the 2-rank checkpoint on 1 rank and finishes with final/;
- beside that job, on the other node, the uninterrupted reference: 1 node x 2 processes.
The losses of every step, before and after each stop, equal the reference's (rel 1e-5).
Wall times are printed (pytest -s), not asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, describe, recipe_env, train_losses
from safetensors.torch import load_file
from test_slurm_jobs import (
    JOB_TIMEOUT_S,
    MAX_STEPS,
    cluster_settings,
    job_ids,
    log,
    smoke_args,
    submit,
    wait_until_ended,
)

from clustertune.slurm.job import job_fields
from clustertune.slurm.submit import TERMINAL_STATES

pytestmark = pytest.mark.slurm

RELATIVE = 1e-5  # fp32 on CPU; FSDP2 on 2 ranks against 1 process: 1e-8 to 2e-7
FSDP2 = ("--launch", "launch/fsdp2.yaml")


@pytest.fixture(scope="module")
def settings(slurm_cluster: Path, tmp_path_factory) -> Path:
    return cluster_settings(tmp_path_factory.mktemp("submitit-fsdp2"))


def last_step(out: Path) -> int:
    return max(train_losses(out) or [0]) if (out / "metrics.jsonl").exists() else 0


def stopped_at(settings: Path, job_id: str) -> list[int]:
    """The steps at which the job's ranks stopped on a signal, saving a checkpoint."""
    text = log(settings, job_id, 0, "err")
    return [int(step) for step in re.findall(r"stopped by SIGUSR2 at step (\d+)", text)]


def wait_while_running(job_id: str, settings: Path, done) -> None:
    """Poll until done() while the job is queued or running."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not done():
        state = (job_fields(job_id) or {}).get("JobState")
        assert time.monotonic() < deadline and state not in TERMINAL_STATES, log(
            settings, job_id, 0, "err"
        )
        time.sleep(0.1)


def submitting(settings: Path, recipe: list[str], *flags: str) -> subprocess.Popen:
    """`clustertune-submit ... --wait` started; test_slurm_jobs.submit, without waiting for it."""
    command = [sys.executable, "slurm/submit.py", "--config", str(settings), *flags, "--wait"]
    return subprocess.Popen(
        [*command, "--", *recipe],
        cwd=REPO,
        env=recipe_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def shards(checkpoint: Path) -> list[str]:
    return sorted(path.name for path in (checkpoint / "dcp").glob("*.distcp"))


def test_fsdp2_preempted_on_two_nodes_requeues_resumes_and_finishes_on_one(
    settings, smoke_assets, tmp_path
):
    out, reference = tmp_path / "preempted", tmp_path / "uninterrupted"
    recipe = smoke_args(smoke_assets, out)
    two_nodes = (*FSDP2, "--nodes", "2", "--processes-per-node", "1", "--max-requeues", "1")
    began = time.monotonic()
    first = submit(settings, recipe, *two_nodes, timeout=120)
    assert first.returncode == 0, describe(first)
    (job_id,) = job_ids(first)

    # Stop 1: the time-limit signal (what --signal=USR2@T sends); node 0 requeues the job.
    wait_while_running(job_id, settings, lambda: last_step(out) >= 2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_while_running(job_id, settings, lambda: stopped_at(settings, job_id))
    # Stop 2: the requeued job resumed and trained a step; at its limit it ends, not requeued.
    (first_stop,) = stopped_at(settings, job_id)
    wait_while_running(job_id, settings, lambda: last_step(out) > first_stop)
    assert (job_fields(job_id) or {}).get("Restarts") == "1"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    fields = wait_until_ended(job_id)
    two_node_s = time.monotonic() - began

    output, errors = log(settings, job_id, 0), log(settings, job_id, 0, "err")
    stops = stopped_at(settings, job_id)
    assert len(stops) == 2 and 2 <= stops[0] < stops[1] < MAX_STEPS, errors
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "1", fields
    assert "lora, dtype fp32, FSDP2" in output and "deepspeed" not in errors
    assert f"requeued job {job_id} (requeue 1 of at most 1)" in errors, errors
    assert "requeued 1 times already (max_requeues=1)" in errors, errors
    assert re.search(rf"resumed from \S+/step_{stops[0]} at step {stops[0]} of {MAX_STEPS}", output)
    assert all("--num_machines 2" in log(settings, job_id, node, "err") for node in (0, 1))
    for step in stops:  # every rank wrote its shard, and the marker says how
        checkpoint = out / "checkpoints" / f"step_{step}"
        assert shards(checkpoint) == ["__0_0.distcp", "__1_0.distcp"], checkpoint
        marker = json.loads((checkpoint / "COMPLETE.json").read_text())
        assert (marker["world_size"], marker["engine"]) == (2, "fsdp2"), marker
    assert not (out / "final").exists()

    one_node = (*FSDP2, "--nodes", "1", "--processes-per-node", "1")
    dry = submit(settings, recipe, *one_node, "--dry-run")
    last = out / "checkpoints" / f"step_{stops[1]}"
    assert dry.returncode == 0, describe(dry)
    assert (
        f"resume: {last} was saved by FSDP2 on 2 rank(s), this launch has 1: "
        "torch.distributed.checkpoint reshards it as it loads." in dry.stdout
    ), describe(dry)
    # The resumed job and the reference at once, one node each.
    began = time.monotonic()
    second = submitting(settings, recipe, *one_node)
    uninterrupted = submitting(
        settings,
        smoke_args(smoke_assets, reference),
        *(*FSDP2, "--nodes", "1", "--processes-per-node", "2"),
    )
    second, uninterrupted = finished(second), finished(uninterrupted)
    one_node_s = time.monotonic() - began

    assert second.returncode == 0, describe(second)
    (second_id,) = job_ids(second)
    output = log(settings, second_id, 0)
    assert re.search(
        rf"resumed from {last} at step {stops[1]} of {MAX_STEPS} \(resharded from 2 to 1 ranks",
        output,
    ), output
    assert uninterrupted.returncode == 0, describe(uninterrupted)
    (reference_id,) = job_ids(uninterrupted)
    assert "lora, dtype fp32, FSDP2" in log(settings, reference_id, 0)
    for run in (out, reference):  # the whole adapter, gathered from the shards
        adapter = load_file(run / "final" / "adapter_model.safetensors")
        assert any("lora_B" in name and float(p.abs().max()) > 0 for name, p in adapter.items())

    resumed, expected = train_losses(out), train_losses(reference)
    assert sorted(resumed) == sorted(expected) == list(range(1, MAX_STEPS + 1))
    gap = {s: abs(resumed[s] - expected[s]) / abs(expected[s]) for s in expected}
    after = [s for s in expected if s > stops[0]]
    print(
        f"\nFSDP2 2 nodes x 1: stopped at steps {stops[0]} and {stops[1]} (requeued once) in "
        f"{two_node_s:.0f} s; then 1 node x 1 (resumed step_{stops[1]}) beside the reference "
        f"1 node x 2 in {one_node_s:.0f} s; loss at step {stops[0] + 1} "
        f"{resumed[stops[0] + 1]:.6f} vs {expected[stops[0] + 1]:.6f}, step {MAX_STEPS} "
        f"{resumed[MAX_STEPS]:.6f} vs {expected[MAX_STEPS]:.6f}; max relative difference "
        f"{max(gap.values()):.1e} ({max(gap[s] for s in after):.1e} after a resume)"
    )
    assert max(gap.values()) <= RELATIVE, (resumed, expected)
