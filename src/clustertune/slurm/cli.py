"""`clustertune-submit`: the command line (argparse `main`) that ties settings, preflight and submission.

    clustertune-submit --config slurm/cluster.yaml --nodes 2 --launch launch/zero2.yaml \\
        -- recipes/finetune.py --config recipes/configs/flan_t5_base/full.yaml
    clustertune-submit --config slurm/dev-cluster.yaml --then evaluate \\
        --eval-config recipes/configs/smoke/evaluate.yaml --wait -- recipes/finetune.py ...
    clustertune-submit ... --prepare-shards 8 -- recipes/finetune.py ...  # prepare array first
    clustertune-submit ... --dry-run   # print the sbatch file(s) and per-node commands only

Every scalar field of SlurmSettings is a flag (`processes_per_node` -> `--processes-per-node`,
its comment the help) that overrides the settings YAML; the lists and the env mapping are set
in the YAML only. The other flags say what to run after the training and how to submit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import shlex
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from draccus.wrappers.docstring import get_attribute_docstring

from clustertune.errors import UserError, exit_on_user_error
from clustertune.slurm.preflight import Then, preflight
from clustertune.slurm.settings import SlurmSettings, load_settings
from clustertune.slurm.submit import describe_plan, describe_submitted, dry_run, submit, wait

SCALAR_TYPES = (str, int, float)
# Settings that only the prepare array (--prepare-shards) uses.
PREPARE_SETTINGS = ("prepare_cpus_per_task", "prepare_partition")


def _flag_type(hint: Any) -> Any:
    """str/int/float for a scalar field (`int | None` included); None for lists and mappings."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        given = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = given[0] if len(given) == 1 else None
    return hint if hint in SCALAR_TYPES else None


def settings_flags() -> Iterator[tuple[str, Any, str]]:
    """(field name, value type, help) of each SlurmSettings field that has a flag."""
    hints = typing.get_type_hints(SlurmSettings)
    for f in dataclasses.fields(SlurmSettings):
        value_type = _flag_type(hints[f.name])
        if value_type is not None:
            comment = get_attribute_docstring(SlurmSettings, f.name).comment_above
            yield f.name, value_type, " ".join(comment.split()).replace("%", "%%")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's errors as a UserError: the house format (one line, exit 2) instead of the
    usage block plus the message. Every parse error goes through `error`; exit_on_error=False
    would not cover them all on Python 3.11 (unrecognized arguments still exit)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (clustertune-submit --help lists the options).")


def _parser() -> argparse.ArgumentParser:
    flagged = [name for name, _, _ in settings_flags()]
    yaml_only = [f.name for f in dataclasses.fields(SlurmSettings) if f.name not in flagged]
    parser = _OneLineErrors(
        prog="clustertune-submit",
        usage="clustertune-submit [--config slurm/<cluster>.yaml] [options] -- RECIPE [recipe args]",
        description="Run a recipe on SLURM (submitit): one task per node, each running "
        "clustertune-launch. Flags override the settings YAML.",
        epilog=f"Settings in the YAML only: {', '.join(yaml_only)}.",
    )
    parser.add_argument(
        "--config", help="cluster settings YAML (slurm/cluster.yaml, slurm/dev-cluster.yaml)"
    )
    settings = parser.add_argument_group("cluster settings (override the YAML)")
    for name, value_type, help_text in settings_flags():
        settings.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=value_type, help=help_text
        )
    parser.add_argument(
        "--then",
        choices=typing.get_args(Then),
        help="submit recipes/evaluate.py after the training succeeds",
    )
    parser.add_argument(
        "--prepare-shards",
        type=int,
        metavar="N",
        help="before the training, a SLURM array of N CPU tasks, task i running "
        "`clustertune-data prepare --shard i/N` with the recipe's config and overrides; the "
        "training starts after all succeed and reads the prepared data (recipes/finetune.py)",
    )
    parser.add_argument("--eval-config", help="evaluation config for --then evaluate")
    parser.add_argument(
        "--eval-launch", help="launch file of the evaluation job (default: --launch)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="block until the job(s) end; exit 1 if one failed"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch file(s) and per-node commands only"
    )
    return parser


def parse_command_line(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, recipe = argv[:split], argv[split + 1 :]
    else:
        own, recipe = argv, []
    parser = _parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        _refuse_unknown(parser, own, unknown, separated="--" in argv)
    if not recipe and not any(a in own for a in ("-h", "--help")):
        raise UserError(
            "no recipe given; end the options with -- and the recipe, e.g. "
            "-- recipes/finetune.py --config recipes/configs/smoke/lora.yaml"
        )
    return args, recipe


def _refuse_unknown(
    parser: argparse.ArgumentParser, own: list[str], unknown: list[str], separated: bool
) -> None:
    """Arguments argparse did not take. Without `--`, the recipe lands here (argparse even
    takes the recipe's own --config as the cluster's): show the command with `--` in place.
    A recipe is a script; other positionals are values of a misspelled option."""
    recipe = next((arg for arg in unknown if arg.endswith(".py")), None)
    if recipe is not None and not separated:
        start = own.index(recipe)
        fixed = shlex.join([*own[:start], "--", *own[start:]])
        raise UserError(
            f"'{recipe}' looks like the recipe: put -- before the recipe and its arguments, "
            f"e.g. clustertune-submit {fixed}"
        )
    # argparse suggests close options itself only from Python 3.14 (suggest_on_error).
    options = [name for action in parser._actions for name in action.option_strings]
    misspelled = next((arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")), "")
    close = difflib.get_close_matches(misspelled, options, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}?" if close else "clustertune-submit --help lists the options"
    raise UserError(
        f"unrecognized arguments: {' '.join(unknown)}; {hint} (the recipe and its arguments "
        "go after --)."
    )


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args, recipe = parse_command_line(sys.argv[1:] if argv is None else argv)
    overrides = {name: getattr(args, name) for name, _, _ in settings_flags()}
    unused = [name for name in PREPARE_SETTINGS if overrides[name] is not None]
    if unused and args.prepare_shards is None:
        flag = f"--{unused[0].replace('_', '-')}"
        raise UserError(
            f"{flag} sets the prepare array's tasks, which only --prepare-shards N submits; "
            f"add --prepare-shards N, or drop {flag}."
        )
    settings = load_settings(args.config, overrides)
    workdir = Path.cwd()
    plan = preflight(
        settings,
        recipe,
        workdir=workdir,
        then=args.then,
        eval_config=args.eval_config,
        eval_launch=args.eval_launch,
        prepare_shards=args.prepare_shards,
    )
    for warning in plan.warnings:
        print(f"clustertune-submit: warning: {warning}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(dry_run(plan), flush=True)
        return 0
    submitted = submit(plan)
    print(describe_plan(plan))
    print(describe_submitted(submitted), flush=True)
    if args.wait:
        try:
            return 0 if wait(submitted) else 1
        except KeyboardInterrupt:
            ids = " ".join(job.job_id for job in submitted)
            print(
                f"\nstopped waiting; the job(s) keep running "
                f"(squeue -j {ids.replace(' ', ',')}; scancel {ids})",
                file=sys.stderr,
            )
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
