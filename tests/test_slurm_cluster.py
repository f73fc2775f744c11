"""Real jobs on the local 2-node SLURM cluster: submitit on 1 and 2 nodes, and a fast requeue."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from clustertune.slurm.env import rendezvous_port

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 120


def submitit_results(folder: Path, function: Any, nodes: int) -> list[Any]:
    """Run `function` as a submitit job (one task per node) and return every task's result."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder)
    executor.update_parameters(
        slurm_partition="debug", timeout_min=5, nodes=nodes, tasks_per_node=1, cpus_per_task=1
    )
    job = executor.submit(function)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} unfinished after {JOB_TIMEOUT_S} s:\n{job.stderr()}")
        time.sleep(0.2)
    return job.results()


def test_one_node_submitit_job(slurm_cluster_1node: Path, tmp_path: Path) -> None:
    def where_am_i() -> dict[str, Any]:  # local, so cloudpickle ships it by value
        import os

        import submitit

        job_env = submitit.JobEnvironment()
        return {"rank": job_env.global_rank, "node": os.environ["SLURMD_NODENAME"]}

    (result,) = submitit_results(tmp_path / "submitit", where_am_i, nodes=1)
    assert result["rank"] == 0
    assert result["node"] in {"n1", "n2"}


def test_two_node_submitit_job_and_launch_args(slurm_cluster_2node: Path, tmp_path: Path) -> None:
    def rank_and_launch() -> dict[str, Any]:
        import os
        from dataclasses import asdict

        import submitit

        from clustertune.slurm.env import launch_args_from_env

        job_env = submitit.JobEnvironment()
        return {
            "job_id": job_env.job_id,
            "global_rank": job_env.global_rank,
            "node": job_env.node,
            "hostnames": job_env.hostnames,
            "launch": asdict(launch_args_from_env(os.environ, processes_per_node=2)),
        }

    results = submitit_results(tmp_path / "submitit", rank_and_launch, nodes=2)
    assert [result["global_rank"] for result in results] == [0, 1]
    assert [result["node"] for result in results] == [0, 1]
    job_id = results[0]["job_id"]
    for result in results:
        assert result["hostnames"] == ["n1", "n2"]
        # n1 does not resolve; the address comes from SLURM's NodeAddr (see resolve_node_address).
        assert result["launch"] == {
            "num_machines": 2,
            "machine_rank": result["node"],
            "main_process_ip": "127.0.0.1",
            "main_process_port": rendezvous_port(job_id),
            "num_processes": 4,
        }


def test_requeued_job_restarts_quickly(slurm_cluster: Path, tmp_path: Path) -> None:
    starts = tmp_path / "starts.txt"
    script = tmp_path / "sleeper.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=1 --output={tmp_path}/slurm-%j.out\n"
        f'echo "$(date +%s.%N) ${{SLURM_RESTART_COUNT:-0}}" >> {starts}\n'
        "sleep 300\n"
    )
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        lines = wait_for_lines(starts, count=1)
        requeued_at = time.time()
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        lines = wait_for_lines(starts, count=2)
        restarted_at, restart_count = lines[1].split()
        gap_s = float(restarted_at) - requeued_at
        # cred_expire=10 + 1 s, then the main scheduler loop runs every second (sched_interval=1);
        # without it the gap was ~60 s.
        assert restart_count == "1"
        print(f"requeue gap: {gap_s:.1f} s")  # a figure for the notes, not an assertion
    finally:
        subprocess.run(["scancel", job_id], check=False)


def wait_for_lines(path: Path, count: int, timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path} has fewer than {count} lines after {timeout_s} s")
