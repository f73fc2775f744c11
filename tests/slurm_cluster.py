"""Pytest fixtures for a real local SLURM cluster (slurm/dev-cluster/start.sh), one per session.

tests/conftest.py imports the fixtures: `slurm_cluster`, `slurm_cluster_1node` and
`slurm_cluster_2node` are all the same 2-node cluster, since a 2-node cluster runs 1-node jobs too
and a session has no reason to pay for two.

The fixture starts the cluster in a fresh directory on free ports (so it can run beside a dev
cluster or another test session), puts its SLURM_CONF and sacct wrapper into os.environ for the
session, yields the directory and stops the cluster at the end. Set CLUSTERTUNE_SLURM_DIR to use
(and leave running) a cluster of your own, started with `start.sh --nodes 2 --dir DIR`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["slurm_cluster", "slurm_cluster_1node", "slurm_cluster_2node"]

REPO = Path(__file__).resolve().parents[1]
START = REPO / "slurm" / "dev-cluster" / "start.sh"
STOP = REPO / "slurm" / "dev-cluster" / "stop.sh"
NODES = 2
EXIT_UNAVAILABLE = 3  # start.sh: not root, or the Debian packages cannot be installed


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below the 20000-60000 rendezvous range."""
    start = 10000 + (os.getpid() * 7) % 9000  # spread concurrent test sessions apart
    for base in list(range(start, 19990, count)) + list(range(10000, start, count)):
        if all(_port_free(base + offset) for offset in range(count)):
            return base
    raise RuntimeError("no block of free ports between 10000 and 20000 for the SLURM cluster")


def _run(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=timeout
    )


def _sourced_env(env_sh: Path) -> dict[str, str]:
    """The variables that `source env.sh` sets or changes (SLURM_CONF and PATH)."""
    shown = subprocess.run(
        ["bash", "-c", f'env -0 && printf "\\1" && source "{env_sh}" && env -0 && :'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    before, after = (
        dict(line.split("=", 1) for line in part.split("\0") if "=" in line)
        for part in shown.split("\1")
    )
    return {name: value for name, value in after.items() if before.get(name) != value}


def start_cluster(cluster_dir: Path, nodes: int = NODES) -> None:
    """Start (or find running) a dev cluster in cluster_dir; skip the test if it cannot run."""
    ports = _free_port_block(nodes + 1)
    began = time.monotonic()
    started = _run(
        START,
        *("--nodes", str(nodes), "--dir", str(cluster_dir)),
        *("--ctld-port", str(ports), "--node-port", str(ports + 1)),
        timeout=600,  # the first start may install the Debian packages
    )
    if started.returncode == EXIT_UNAVAILABLE:
        pytest.skip(f"no local SLURM cluster: {started.stderr.strip().splitlines()[-1]}")
    if started.returncode != 0:
        raise RuntimeError(
            f"{START} failed with exit status {started.returncode}:\n"
            f"{started.stdout}{started.stderr}"
        )
    print(f"SLURM dev cluster up in {time.monotonic() - began:.1f} s: {cluster_dir}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """A 2-node SLURM cluster for the whole session; yields its directory."""
    own_dir = os.environ.get("CLUSTERTUNE_SLURM_DIR")
    if own_dir:
        cluster_dir = Path(own_dir)
        nodes_file = cluster_dir / "nodes"
        if not nodes_file.exists() or nodes_file.read_text().strip() != str(NODES):
            pytest.fail(
                f"CLUSTERTUNE_SLURM_DIR={own_dir} holds no {NODES}-node cluster; "
                f"run {START} --nodes {NODES} --dir {own_dir} first."
            )
    else:
        # Not under pytest's tmp_path: it is private to root, and munged (user munge) must
        # reach its socket inside the cluster directory.
        cluster_dir = Path(tempfile.mkdtemp(prefix="clustertune-slurm-test-", dir="/tmp"))
        try:
            start_cluster(cluster_dir)
        except BaseException:  # a skip too: leave no directory behind
            shutil.rmtree(cluster_dir, ignore_errors=True)
            raise
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _sourced_env(cluster_dir / "env.sh").items():
            patch.setenv(name, value)
        try:
            yield cluster_dir
        finally:
            if not own_dir:
                _run(STOP, "--dir", str(cluster_dir), timeout=120)
                shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster_1node(slurm_cluster: Path) -> Path:
    """The session's cluster, for tests that submit 1-node jobs."""
    return slurm_cluster


@pytest.fixture(scope="session")
def slurm_cluster_2node(slurm_cluster: Path) -> Path:
    """The session's cluster, for tests that submit 2-node jobs."""
    return slurm_cluster
