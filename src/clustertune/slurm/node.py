"""The per-node command: what each SLURM task (one per node) runs, built in one place.

    python -m clustertune.slurm.node --launch LAUNCH_FILE --processes-per-node N -- RECIPE ARGS...

`node_command` turns this node's launch arguments (clustertune.slurm.env) into
`python -m clustertune.launch ...`; the submitit job (clustertune.slurm.job.LaunchJob) runs it
as a child, and slurm/train.sbatch and slurm/evaluate.sbatch run it through this module's entry
point under srun, which replaces itself with that command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clustertune.config import load_yaml_mapping
from clustertune.errors import exit_on_user_error
from clustertune.slurm.env import NodeLaunch, accelerate_launch_argv, launch_args_from_env
from clustertune.stop import launcher_preexec


def distributed_type(launch: Mapping[str, Any]) -> str:
    """A launch file's distributed_type, upper case; NO (one process) where it names none."""
    return str(launch.get("distributed_type", "NO")).upper()


def node_command(
    node: NodeLaunch, launch_config: str, recipe_argv: Sequence[str], *, is_deepspeed: bool
) -> list[str]:
    """This node's `clustertune-launch` command: `accelerate launch`'s arguments, with the
    rendezvous flags overriding the launch file's values."""
    argv = accelerate_launch_argv(node, launch_config, recipe_argv[0], list(recipe_argv[1:]))
    flags = argv[2:]  # drop "accelerate launch": clustertune-launch takes the same arguments
    # DDP and FSDP launch files go through accelerate's torchrun launcher, which takes these
    # flags as they are (--num_machines, --machine_rank: torchrun's --nnodes, --node_rank).
    if is_deepspeed:
        # One launcher per node, like torchrun; accelerate's default for several machines
        # is pdsh, which would ssh into the other nodes itself.
        flags = ["--deepspeed_multinode_launcher", "standard", *flags]
    return [sys.executable, "-m", "clustertune.launch", *flags]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clustertune.slurm.node",
        usage="%(prog)s --launch LAUNCH_FILE --processes-per-node N -- RECIPE [recipe args]",
        description="Run this node's clustertune-launch inside a SLURM job step (one task per "
        "node): rendezvous arguments from SLURM's variables.",
    )
    parser.add_argument("--launch", required=True, help="accelerate launch file")
    parser.add_argument(
        "--processes-per-node", type=int, required=True, help="training processes on this node"
    )
    parser.add_argument("recipe", nargs=argparse.REMAINDER, help="-- RECIPE [recipe args]")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    recipe = args.recipe[1:] if args.recipe[:1] == ["--"] else args.recipe
    if not recipe:
        parser.error("no recipe given; end the options with -- and the recipe")
    node = launch_args_from_env(os.environ, args.processes_per_node)
    is_deepspeed = distributed_type(load_yaml_mapping(Path(args.launch))) == "DEEPSPEED"
    command = node_command(node, args.launch, recipe, is_deepspeed=is_deepspeed)
    # What LaunchJob does for its child, here for the exec: USR1/USR2 ignored, so torchrun
    # inherits that and survives SLURM's step-wide signal (clustertune-launch and the workers
    # install their own handlers); and die with the parent (slurmstepd).
    launcher_preexec()
    print("node", os.environ.get("SLURMD_NODENAME"), "runs", shlex.join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
