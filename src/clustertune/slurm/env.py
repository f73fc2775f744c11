"""SLURM's environment -> one node's `accelerate launch` arguments (rendezvous address and port).

Inside an allocation every node runs the same command; SLURM tells each one who it is through
SLURM_JOB_NODELIST, SLURM_NNODES and SLURM_NODEID. The first node of the list hosts the
rendezvous, on a port derived from SLURM_JOB_ID so that all nodes agree without talking.
Pure functions of the environment (plus a DNS / `scontrol show node` lookup of the first
node); the command built from them is in clustertune.slurm.node.
"""

from __future__ import annotations

import re
import socket
import subprocess
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import product

from clustertune.errors import UserError

# Rendezvous ports for jobs that do not set MASTER_PORT: 40,001 choices above the well-known
# service ports.
PORT_MIN = 20000
PORT_MAX = 60000


class SlurmEnvError(UserError, ValueError):
    """The SLURM environment is missing a variable or holds one that makes no sense."""


@dataclass(frozen=True, kw_only=True)
class NodeLaunch:
    """What `accelerate launch` needs on one node of a multi-node job."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    num_processes: int  # all processes of the job: num_machines * processes per node


_HOST_WITH_RANGES = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(spec: str) -> list[str]:
    """Expand SLURM hostlist syntax: `n[1-2]` -> n1, n2; `gpu[01-03,07],cpu5`; zero padding kept."""
    hosts: list[str] = []
    for item in _split_top_level(spec):
        pieces: list[list[str]] = []
        position = 0
        for match in _HOST_WITH_RANGES.finditer(item):
            pieces.append([item[position : match.start()]])
            pieces.append(_expand_ranges(match.group(1), spec))
            position = match.end()
        tail = item[position:]
        if "[" in tail or "]" in tail:
            raise SlurmEnvError(f"hostlist {spec!r} has unbalanced brackets in {item!r}.")
        pieces.append([tail])
        hosts.extend("".join(parts) for parts in product(*pieces))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    """Split on the commas that separate hosts, not the ones inside `[...]`."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(spec):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise SlurmEnvError(f"hostlist {spec!r} has unbalanced or nested brackets.")
        if char == "," and depth == 0:
            items.append(spec[start:index])
            start = index + 1
    items.append(spec[start:])
    if depth != 0 or not all(item.strip() for item in items):
        raise SlurmEnvError(f"hostlist {spec!r} is empty, has an empty entry or an open bracket.")
    return [item.strip() for item in items]


def _expand_ranges(ranges: str, spec: str) -> list[str]:
    """`01-03,07` -> 01, 02, 03, 07: the width of the low end sets the zero padding."""
    numbers: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or not (high or low).isdigit() or int(high or low) < int(low):
            raise SlurmEnvError(f"hostlist {spec!r} has a bad range {part!r} inside brackets.")
        numbers.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high or low) + 1))
    return numbers


def resolve_node_address(host: str) -> str:
    """The IPv4 address of a node: DNS first, then the NodeAddr that SLURM itself uses.

    Node names need not resolve (the local dev cluster has n1 and n2, both at 127.0.0.1), but
    slurmd must reach each node, so `scontrol show node` always knows an address.
    """
    try:
        return socket.gethostbyname(host)
    except OSError as dns_error:
        try:
            shown = subprocess.run(
                ["scontrol", "show", "node", "--oneliner", host],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            raise dns_error from None
        match = re.search(r"\bNodeAddr=(\S+)", shown)
        if match is None:
            raise dns_error from None
        return socket.gethostbyname(match.group(1))


def _require(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    either = " or ".join(names)
    raise SlurmEnvError(
        f"{either} is not set; run this inside a SLURM allocation (sbatch/srun/salloc), "
        "one launcher per node."
    )


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{name}={value!r} is not a whole number.") from None


def rendezvous_port(job_id: str) -> int:
    """A port in [PORT_MIN, PORT_MAX] that every node of the job computes the same way.

    Consecutive job ids get consecutive ports, so jobs sharing a node do not collide unless
    their ids are 40,001 apart. Non-numeric ids are hashed.
    """
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_MIN + key % (PORT_MAX - PORT_MIN + 1)


def launch_args_from_env(
    env: Mapping[str, str],
    processes_per_node: int,
    resolve: Callable[[str], str] = resolve_node_address,
) -> NodeLaunch:
    """Where this node sits in the job and where the rendezvous is, from SLURM's variables.

    MASTER_ADDR and MASTER_PORT, when set, win over the values derived from the node list and
    the job id.
    """
    if processes_per_node < 1:
        raise SlurmEnvError(f"processes_per_node must be at least 1, got {processes_per_node}.")
    nodelist_name = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    nodelist = _require(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_hostlist(nodelist)
    num_machines = _int("SLURM_NNODES", _require(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
    machine_rank = _int("SLURM_NODEID", _require(env, "SLURM_NODEID"))
    if num_machines != len(hosts):
        raise SlurmEnvError(
            f"SLURM_NNODES={num_machines} but {nodelist_name}={nodelist!r} names {len(hosts)} "
            "hosts; launch one process per node with the job's own environment."
        )
    if not 0 <= machine_rank < num_machines:
        raise SlurmEnvError(f"SLURM_NODEID={machine_rank} is outside 0..{num_machines - 1}.")

    if env.get("MASTER_ADDR"):
        main_process_ip = env["MASTER_ADDR"]
    else:
        try:
            main_process_ip = resolve(hosts[0])
        except OSError as error:
            raise SlurmEnvError(
                f"cannot resolve the first node {hosts[0]!r} of {nodelist_name}={nodelist!r} "
                f"({error}); set MASTER_ADDR to that node's IP address."
            ) from error

    if env.get("MASTER_PORT"):
        main_process_port = _int("MASTER_PORT", env["MASTER_PORT"])
        if not 1 <= main_process_port <= 65535:
            raise SlurmEnvError(f"MASTER_PORT={main_process_port} is not a TCP port (1-65535).")
    else:
        main_process_port = rendezvous_port(_require(env, "SLURM_JOB_ID"))

    return NodeLaunch(
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        num_processes=num_machines * processes_per_node,
    )


def accelerate_launch_argv(
    node: NodeLaunch, launch_config: str, script: str, script_args: list[str]
) -> list[str]:
    """The `accelerate launch` command for this node; flags override the launch file's values."""
    return [
        "accelerate",
        "launch",
        "--config_file",
        launch_config,
        "--num_machines",
        str(node.num_machines),
        "--machine_rank",
        str(node.machine_rank),
        "--main_process_ip",
        node.main_process_ip,
        "--main_process_port",
        str(node.main_process_port),
        "--num_processes",
        str(node.num_processes),
        script,
        *script_args,
    ]
