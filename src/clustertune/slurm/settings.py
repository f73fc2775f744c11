"""Cluster settings (`SlurmSettings`): the typed keys of slurm/*.yaml, how they load, and their checks.

Settings come from a YAML in slurm/ plus command-line overrides (clustertune.slurm.cli derives
its flags from the fields below, their comments included as help). Loading uses the recipes'
config machinery (clustertune.config): YAML read once, unknown keys refused with the nearest
valid key, values decoded by draccus. Every value check is in `SlurmSettings.validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from clustertune.config import _field_paths, _unknown_key_error, config_from_dict, load_yaml_mapping
from clustertune.errors import UserError

# sbatch's --signal fires this long before the time limit at the latest; a smaller delay
# leaves no time to finish the step in flight and save.
MIN_SIGNAL_DELAY_S = 30


@dataclass
class SlurmSettings:
    # Partition (`sinfo -s` lists them); empty: the cluster's default partition.
    partition: str | None = None
    # Account to bill, where the cluster requires one.
    account: str | None = None
    # Quality of service, where the cluster requires one.
    qos: str | None = None
    # Nodes of the allocation; one task per node runs that node's processes.
    nodes: int = 1
    # GPUs per node; 0 for CPU-only nodes (then set processes_per_node).
    gpus_per_node: int = 0
    # Training processes per node; default: one per GPU. world size = nodes x this.
    processes_per_node: int | None = None
    # CPUs per node for its task (data loading and the launcher run inside it).
    cpus_per_task: int | None = None
    # Memory per node in GB (empty: the partition's default).
    mem_gb: float | None = None
    # Wall-clock limit per run of the job, a quoted SLURM time: 'MM', 'HH:MM:SS' or 'D-HH:MM:SS'.
    time: str = "01:00:00"
    # Node features to require (sbatch --constraint), e.g. a100.
    constraint: str | None = None
    # accelerate launch file: launch/ddp.yaml, launch/zero2.yaml, ...
    launch: str = "launch/ddp.yaml"
    # Further sbatch options as long flags, e.g. [--exclusive, --mail-type=END].
    sbatch_flags: list[str] = field(default_factory=list)
    # Shell lines run before the tasks start, e.g. [module load cuda/12.4, source .venv/bin/activate].
    setup: list[str] = field(default_factory=list)
    # Environment variables for the job, e.g. {HF_HUB_OFFLINE: '1'}.
    env: dict[str, str] = field(default_factory=dict)
    # Requeues after a stop with a checkpoint (time limit, preemption), SLURM's own included.
    max_requeues: int = 3
    # The warning signal (USR2) comes this many seconds before the time limit: enough to finish
    # the step in flight and write a checkpoint (ZeRO-3 of a 3B model: ~1 min on fast storage).
    signal_delay_s: int = 120
    # submitit's folder for sbatch files and logs (%j: job id); must be on shared storage.
    folder: str = "slurm_logs/%j"
    # Job name shown by squeue; the evaluation job of a chain gets "-eval" appended.
    job_name: str = "clustertune"

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node  # type: ignore[operator]

    def validate(self) -> SlurmSettings:
        """The one check of the values (each failure one UserError). Fills in the default of
        processes_per_node first (one per GPU), since the checks depend on it."""
        if self.processes_per_node is None:
            if self.gpus_per_node < 1:
                raise UserError(
                    "gpus_per_node is 0 (CPU-only nodes): set processes_per_node "
                    "(or --processes-per-node) to the processes each node should run."
                )
            self.processes_per_node = self.gpus_per_node
        for name in ("nodes", "processes_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.gpus_per_node < 0 or self.max_requeues < 0:
            raise UserError("gpus_per_node and max_requeues cannot be negative.")
        if self.gpus_per_node and self.processes_per_node > self.gpus_per_node:
            raise UserError(
                f"processes_per_node={self.processes_per_node} is more than gpus_per_node="
                f"{self.gpus_per_node}; run one process per GPU."
            )
        time_s = parse_time_minutes(self.time) * 60
        if not MIN_SIGNAL_DELAY_S <= self.signal_delay_s < time_s:
            raise UserError(
                f"signal_delay_s={self.signal_delay_s} must be at least {MIN_SIGNAL_DELAY_S} "
                f"and less than time={self.time!r} ({time_s} s)."
            )
        for flag in self.sbatch_flags:
            if not flag.startswith("--") or len(flag) < 3:
                raise UserError(
                    f"sbatch_flags entry {flag!r} must be a long option such as --exclusive "
                    "or --mail-type=END."
                )
        return self


def parse_time_minutes(value: str) -> int:
    """SLURM time formats -> minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if match is None:
        raise UserError(
            f"time={value!r} is not a SLURM time; use 'MM', 'HH:MM:SS' or 'D-HH:MM:SS'."
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:  # H:M:S
        hours, minutes, seconds = int(first), int(second), int(third)
    else:  # M or M:S
        hours, minutes, seconds = 0, int(first), int(second or 0)
    total_s = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total_s <= 0:
        raise UserError(f"time={value!r} is zero; give the job some time.")
    return -(-total_s // 60)


def load_settings(path: str | None, overrides: dict[str, Any]) -> SlurmSettings:
    """Settings from a YAML in slurm/ plus command-line overrides (None: not given), checked."""
    raw = load_yaml_mapping(path) if path else {}
    where = f"'{path}'" if path else "the defaults"
    known = [key for key, _ in _field_paths(SlurmSettings)]
    for key in raw:
        if key not in known:
            # The recipes' unknown-key error, naming the file's kind: a user with a cluster
            # YAML and a recipe YAML on one command line sees which of the two has the typo.
            error = _unknown_key_error(str(key), known, where)
            raise UserError(str(error).replace("unknown config key", "unknown SLURM setting", 1))
    if isinstance(raw.get("time"), int):  # YAML reads 04:00:00 as 14400 and 90 as a number
        raise UserError(
            f"time in {where} must be a quoted string like '04:00:00' or '90' (minutes)."
        )
    raw.update({key: value for key, value in overrides.items() if value is not None})
    try:
        settings = config_from_dict(SlurmSettings, raw)
    except Exception as error:  # draccus' DecodingError: a string where a number belongs, ...
        raise UserError(f"invalid SLURM setting in {where}: {error}".replace("\n", " ")) from None
    return settings.validate()
