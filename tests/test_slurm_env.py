"""SLURM environment -> accelerate launch arguments: pure functions, no cluster needed."""

from __future__ import annotations

import socket

import pytest

from clustertune.errors import UserError
from clustertune.slurm.env import (
    PORT_MAX,
    PORT_MIN,
    NodeLaunch,
    SlurmEnvError,
    accelerate_launch_argv,
    expand_hostlist,
    launch_args_from_env,
    rendezvous_port,
)


def fake_dns(host: str) -> str:
    """n1 -> 10.0.0.1, gpu07 -> 10.0.0.7; anything else does not resolve."""
    digits = "".join(char for char in host if char.isdigit())
    if not digits:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return f"10.0.0.{int(digits)}"


def slurm_env(nodelist: str, node_id: int, job_id: str = "4242", **extra: str) -> dict[str, str]:
    return {
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NNODES": str(len(expand_hostlist(nodelist))),
        "SLURM_NODEID": str(node_id),
        "SLURM_JOB_ID": job_id,
        **extra,
    }


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node[001-016]", [f"node{n:03d}" for n in range(1, 17)]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("a,b-1,c[2]", ["a", "b-1", "c2"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("n[1-2].cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
    ],
)
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[1-2]],x", "a,,b"])
def test_expand_hostlist_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(spec)


def test_one_node() -> None:
    node = launch_args_from_env(slurm_env("n1", 0), processes_per_node=2, resolve=fake_dns)
    assert node == NodeLaunch(
        num_machines=1,
        machine_rank=0,
        main_process_ip="10.0.0.1",
        main_process_port=rendezvous_port("4242"),
        num_processes=2,
    )


def test_two_nodes_agree_on_everything_but_rank() -> None:
    nodes = [
        launch_args_from_env(slurm_env("n[1-2]", rank), processes_per_node=4, resolve=fake_dns)
        for rank in (0, 1)
    ]
    assert [node.machine_rank for node in nodes] == [0, 1]
    for node in nodes:
        assert node.num_machines == 2
        assert node.num_processes == 8  # 2 nodes * 4 processes per node
        assert node.main_process_ip == "10.0.0.1"  # the first node hosts the rendezvous
        assert node.main_process_port == nodes[0].main_process_port


def test_sixteen_nodes_with_zero_padding_and_legacy_nodelist_variable() -> None:
    env = slurm_env("node[003-018]", 15)
    env["SLURM_NODELIST"] = env.pop("SLURM_JOB_NODELIST")
    node = launch_args_from_env(env, processes_per_node=8, resolve=fake_dns)
    assert (node.num_machines, node.machine_rank, node.num_processes) == (16, 15, 128)
    assert node.main_process_ip == "10.0.0.3"


def test_port_is_deterministic_and_in_range() -> None:
    job_ids = ["1", "2", "20000", "40001", "999999999", "123_4"]
    ports = [rendezvous_port(job_id) for job_id in job_ids]
    assert ports == [rendezvous_port(job_id) for job_id in job_ids]
    assert all(PORT_MIN <= port <= PORT_MAX for port in ports)
    assert rendezvous_port("1") != rendezvous_port("2")  # neighbouring jobs do not collide


def test_master_addr_and_port_override() -> None:
    def no_dns(host: str) -> str:
        raise AssertionError(f"should not resolve {host} when MASTER_ADDR is set")

    env = slurm_env("n[1-2]", 1, MASTER_ADDR="192.168.5.5", MASTER_PORT="29500")
    del env["SLURM_JOB_ID"]  # not needed once MASTER_PORT is given
    node = launch_args_from_env(env, processes_per_node=1, resolve=no_dns)
    assert (node.main_process_ip, node.main_process_port) == ("192.168.5.5", 29500)


def test_unresolvable_first_node_names_it_and_suggests_master_addr() -> None:
    with pytest.raises(SlurmEnvError, match=r"'alpha'.*MASTER_ADDR"):
        launch_args_from_env(slurm_env("alpha,n2", 1), processes_per_node=1, resolve=fake_dns)


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NODEID"])
def test_missing_variable_is_one_clear_error(missing: str) -> None:
    env = slurm_env("n[1-2]", 0)
    del env[missing]
    with pytest.raises(ValueError, match=rf"{missing}.* is not set; run this inside a SLURM"):
        launch_args_from_env(env, processes_per_node=1, resolve=fake_dns)


def test_missing_job_id_without_master_port() -> None:
    env = slurm_env("n1", 0)
    del env["SLURM_JOB_ID"]
    with pytest.raises(UserError, match="SLURM_JOB_ID is not set"):
        launch_args_from_env(env, processes_per_node=1, resolve=fake_dns)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SLURM_NNODES": "3"}, "names 2 hosts"),
        ({"SLURM_NODEID": "2"}, "outside 0..1"),
        ({"SLURM_NODEID": "first"}, "not a whole number"),
        ({"MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_inconsistent_values_are_rejected(changes: dict[str, str], message: str) -> None:
    env = {**slurm_env("n[1-2]", 0), **changes}
    with pytest.raises(SlurmEnvError, match=message):
        launch_args_from_env(env, processes_per_node=1, resolve=fake_dns)


def test_accelerate_launch_argv() -> None:
    node = NodeLaunch(
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=24242,
        num_processes=4,
    )
    argv = accelerate_launch_argv(node, "launch/zero2.yaml", "recipes/finetune.py", ["--x=1"])
    assert argv == [
        "accelerate", "launch", "--config_file", "launch/zero2.yaml",
        "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "24242",
        "--num_processes", "4",
        "recipes/finetune.py", "--x=1",
    ]  # fmt: skip
