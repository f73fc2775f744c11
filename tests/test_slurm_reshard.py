"""A SLURM job resubmitted on another cluster shape continues its run (issue 14), on the local
2-node cluster: 2 nodes x 1 process (ZeRO-2 LoRA) stopped by the time-limit signal, then the same
output_dir resubmitted as 1 node x 1 process: --dry-run says it will reshard, the job converts
the checkpoint to DeepSpeed's universal form, finishes with final/ and the losses of a run that
was never interrupted."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from helpers import REPO, describe, launch_command, run, train_losses
from test_slurm_jobs import JOB_TIMEOUT_S, job_ids, log, smoke_args, submit, wait_until_ended

from clustertune.slurm.job import job_fields
from clustertune.slurm.submit import TERMINAL_STATES

pytestmark = pytest.mark.slurm

RELATIVE = 1e-5


def test_resubmitted_on_one_node_continues_a_two_node_run(slurm_cluster, smoke_assets, tmp_path):
    settings = tmp_path / "cluster.yaml"
    values = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    settings.write_text(yaml.safe_dump({**values, "folder": str(tmp_path / "logs" / "%j")}))
    out, reference = tmp_path / "run", tmp_path / "uninterrupted"
    uninterrupted = run(
        launch_command("recipes/finetune.py", smoke_args(smoke_assets, reference)[1:])
    )
    assert uninterrupted.returncode == 0, describe(uninterrupted)

    shape = ("--launch", "launch/zero2.yaml", "--processes-per-node", "1")
    recipe = smoke_args(smoke_assets, out)
    first = submit(settings, recipe, *shape, "--nodes", "2", "--max-requeues", "0", timeout=120)
    assert first.returncode == 0, describe(first)
    (job_id,) = job_ids(first)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((out / "metrics.jsonl").exists() and max(train_losses(out) or [0]) >= 2):
        state = (job_fields(job_id) or {}).get("JobState")
        assert time.monotonic() < deadline and state not in TERMINAL_STATES, log(
            settings, job_id, 0, "err"
        )
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what --signal=USR2@T does
    wait_until_ended(job_id)
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    assert json.loads((checkpoint / "COMPLETE.json").read_text())["world_size"] == 2
    assert not (out / "final").exists()

    dry = submit(settings, recipe, *shape, "--nodes", "1", "--dry-run")
    assert dry.returncode == 0 and "will reshard from 2 to 1 ranks" in dry.stdout, describe(dry)
    second = submit(settings, recipe, *shape, "--nodes", "1", "--wait")
    assert second.returncode == 0, describe(second)
    (second_id,) = job_ids(second)
    output = log(settings, second_id, 0)
    assert f"resumed from {checkpoint}" in output and "resharded from 2 to 1 ranks" in output, (
        output
    )
    assert (out / "final" / "adapter_model.safetensors").is_file()
    resumed, expected = train_losses(out), train_losses(reference)
    assert sorted(resumed) == sorted(expected)
    gap = max(abs(resumed[s] - expected[s]) / abs(expected[s]) for s in expected)
    print(
        f"\nstopped at {checkpoint.name} on 2 nodes, finished on 1: max relative |d loss| {gap:.1e}"
    )
    assert gap <= RELATIVE, (resumed, expected)
