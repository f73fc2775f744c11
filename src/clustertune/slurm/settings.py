"""Cluster settings (`SlurmSettings`): the typed keys of slurm/*.yaml, how they load, and their checks.

Settings come from a YAML in slurm/ plus command-line overrides (clustertune.slurm.cli derives
its flags from the fields below, their comments included as help). Loading uses the recipes'
config machinery (clustertune.config): YAML read once, unknown keys refused with the nearest
valid key, values decoded by draccus. Every value check is in `SlurmSettings.validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
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
    # Wall-clock limit per run of the job, a quoted SLURM time: 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH',
    # 'D-HH:MM' or 'D-HH:MM:SS'.
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
    # Job name shown by squeue; the evaluation job of a chain gets "-eval" appended, the prepare
    # array (--prepare-shards) "-prepare".
    job_name: str = "clustertune"
    # CPUs of each prepare array task (--prepare-shards), its tokenising processes; empty:
    # cpus_per_task.
    prepare_cpus_per_task: int | None = None
    # Partition of the prepare array tasks, which need CPUs only; empty: partition.
    prepare_partition: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node  # type: ignore[operator]

    def validate(self) -> SlurmSettings:
        """The one check of the values (each failure one UserError). Fills in the default of
        processes_per_node first (one per GPU), since the checks depend on it."""
        check_no_control_characters(self)
        for name in COUNTS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(
                    f"{name}={value} is negative; {COUNTS[name]} (--{name.replace('_', '-')})."
                )
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


# The values that count something, and what a valid one is (negative ones are refused first).
COUNTS = {
    "nodes": "use at least 1",
    "gpus_per_node": "use 0 for CPU-only nodes, else the GPUs of each node",
    "processes_per_node": "use at least 1, or leave it unset for one per GPU",
    "cpus_per_task": "use at least 1, or leave it unset for the partition's default",
    "prepare_cpus_per_task": "use at least 1, or leave it unset for cpus_per_task",
    "mem_gb": "use the memory per node in GB, or leave it unset for the partition's default",
    "max_requeues": "use 0 for none",
    "signal_delay_s": f"use at least {MIN_SIGNAL_DELAY_S} seconds",
}
TIME_FORMATS = "'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS'"
# SLURM's time formats (sbatch --time): the first field is unbounded, every later one is a
# field of a clock: hours 0-23 after days, minutes and seconds 0-59 after a larger unit.
_TIME_FORMATS = (
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
_FIELD_LIMITS = {"hours": 23, "minutes": 59, "seconds": 59}
_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def parse_time_minutes(value: str) -> int:
    """A SLURM time (TIME_FORMATS) -> minutes, rounded up as SLURM does."""
    matched = next(
        ((names, match) for pattern, names in _TIME_FORMATS if (match := pattern.fullmatch(value))),
        None,
    )
    if matched is None:
        raise UserError(f"time={value!r} is not a SLURM time; use {TIME_FORMATS}.")
    names, match = matched
    numbers = [int(group) for group in match.groups()]
    for position, (name, number) in enumerate(zip(names, numbers, strict=True)):
        limit = _FIELD_LIMITS.get(name, number)
        if position > 0 and number > limit:
            raise UserError(
                f"time={value!r}: {number} {name} is out of range (0-{limit} after "
                f"{names[position - 1]}); use {TIME_FORMATS}, e.g. '1-12:00:00' for 36 hours."
            )
    total_s = sum(_SECONDS[name] * n for name, n in zip(names, numbers, strict=True))
    if total_s <= 0:
        raise UserError(f"time={value!r} is zero; give the job some time.")
    return -(-total_s // 60)


def _control_character(text: str) -> str | None:
    """The first control character of `text` (a newline, a tab, ...), as Python writes it."""
    found = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    return None if found is None else repr(found)


def check_no_control_characters(settings: SlurmSettings) -> None:
    """Every value ends up in an sbatch header line or a shell line of the job's script: a
    newline would start another #SBATCH line or command. Refused, naming the setting."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        items: list[tuple[str, Any]]
        if isinstance(value, dict):
            items = [(f"{f.name} key {k!r}", k) for k in value]
            items += [(f"{f.name}[{k!r}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{f.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(f.name, value)]
        for where, item in items:
            found = _control_character(item) if isinstance(item, str) else None
            if found is not None:
                hint = " (one shell line per setup entry)" if f.name == "setup" else ""
                raise UserError(
                    f"{where}={item!r} holds the control character {found}, which would break "
                    f"the job's sbatch script; remove it{hint}."
                )
    for name in settings.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(
                f"env key {name!r} is not an environment variable name (letters, digits and _, "
                "not starting with a digit); fix it in the settings YAML."
            )


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
