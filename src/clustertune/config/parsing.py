"""Parsing configs: `--config FILE` plus `--section.key=value` overrides through draccus,
unknown keys refused with the nearest valid name (in the YAML and on the command line),
one-line errors, and the resolved config written next to the outputs."""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_origin

import draccus
import yaml

from clustertune.atomicio import write_text_atomic
from clustertune.config.checks import check_choice
from clustertune.errors import UserError

T = TypeVar("T")


def _field_paths(cls: type, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Yield (dotted key, is_section) for every field of a nested dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield key, True
            yield from _field_paths(hints[f.name], key + ".")
        else:
            yield key, False


def _string_fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys whose type is str or str | None."""
    hints, found = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found |= _string_fields(hint, f"{prefix}{f.name}.")
        elif hint is str or hint == (str | None):
            found.add(f"{prefix}{f.name}")
    return found


def _quote_string_values(cls: type, overrides: list[str]) -> list[str]:
    """draccus reads command-line values as YAML, so `--data.prompt_template=Dialogue: {x}`
    would become a mapping. A value for a string field is passed as a quoted YAML string."""
    strings, out, items = _string_fields(cls), [], list(overrides)
    while items:
        arg = items.pop(0)
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in strings:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif items and not items[0].startswith("--"):
                value = items.pop(0)
            else:
                out.append(arg)
                continue
            keep = value[:1] in ("'", '"') or value in ("null", "~")  # already quoted, or None
            quoted = value if keep else json.dumps(value)
            out.append(f"--{key}={quoted}")
        else:
            out.append(arg)
    return out


def _unknown_key_error(
    key: str, paths: Mapping[str, bool] | Sequence[str], where: str
) -> UserError:
    """`paths`: every dotted key -> whether it is a section (or just the valid keys). A
    misspelled section (`trian:` in YAML, `--trian.max_steps`) is matched as a section, so
    its keys are suggested under the section it was meant to be."""
    if not isinstance(paths, Mapping):
        paths = dict.fromkeys(paths, False)
    sections = [k for k, is_section in paths.items() if is_section]
    section, dot, rest = key.rpartition(".")
    close: list[str] = []
    if dot and section not in paths:
        nearest = difflib.get_close_matches(section, sections, n=1, cutoff=0.5)
        if nearest and f"{nearest[0]}.{rest}" in paths:
            close = [f"{nearest[0]}.{rest}"]
        elif nearest:
            close = nearest
    if not close:
        leaves = [k for k, is_section in paths.items() if not is_section]
        close = difflib.get_close_matches(key, [*leaves, *sections], n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for the valid keys."
    return UserError(f"unknown config key '{key}' in {where}; {hint}")


def _check_list_values(cls: type, values: dict[str, Any], where: str) -> None:
    """A list key given a plain string: draccus's error is two lines about list parsing."""
    hints = _leaf_hints(cls)
    for key, value in values.items():
        if get_origin(hints.get(key)) is list and isinstance(value, str):
            items = value.strip().strip("[]")
            if where == "the command line":
                if value.strip().startswith("["):
                    continue  # YAML flow syntax; draccus reads it
                fix = f"--{key}=[{items}]"
            else:
                fix = (
                    f"{key.rpartition('.')[2]}: [{', '.join(i.strip() for i in items.split(','))}]"
                )
            raise UserError(f"{key}={value!r} in {where} is not a list; write {fix}")


def _check_list_items(cls: type, values: dict[str, Any], where: str) -> None:
    """Keys of the items of a list of sections (data.mixture): each known to the item's
    dataclass, or one line naming the item and the nearest key."""
    hints = _leaf_hints(cls)
    for key, value in values.items():
        item_type = typing.get_args(hints.get(key))[:1]
        if get_origin(hints.get(key)) is not list or not dataclasses.is_dataclass(
            item_type[0] if item_type else None
        ):
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # draccus reports it
        if not isinstance(value, list):
            continue
        valid = [f.name for f in dataclasses.fields(item_type[0])]
        item_hints = typing.get_type_hints(item_type[0])
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise UserError(f"{key}[{index}] in {where} is not a mapping of keys to values.")
            for name in item:
                if name not in valid:
                    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
                    hint = (
                        f"did you mean '{key}[{index}].{close[0]}'?"
                        if close
                        else (f"its keys are {', '.join(valid)}.")
                    )
                    raise UserError(
                        f"unknown config key '{key}[{index}].{name}' in {where}; {hint}"
                    )
                check_choice(f"{key}[{index}].{name}", item[name], item_hints[name])


def _flatten(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield dotted, None
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    config_path, rest, items = None, [], list(argv)
    while items:
        arg = items.pop(0)
        if arg in ("--config", "--config_path"):
            if not items:
                raise UserError(f"{arg} needs a YAML file path after it.")
            config_path = items.pop(0)
        elif arg.startswith(("--config=", "--config_path=")):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_path, rest


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UserError(
            f"cannot read config file '{path}' ({error.strerror}); check the --config path."
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(
            f"config file '{path}' is not valid YAML: {error}".replace("\n", " ")
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values.")
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `--config FILE` plus `--section.key=value` overrides.

    Unknown keys anywhere fail with one sentence suggesting the nearest valid key.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, overrides = _split_config_arg(argv)
    paths = dict(_field_paths(cls))
    file_values: dict[str, Any] = {}
    if config_path is not None:
        for key, value in _flatten(load_yaml_mapping(config_path)):
            if key not in paths:
                raise _unknown_key_error(key, paths, f"config file '{config_path}'")
            file_values[key] = value
    for arg in overrides:
        if arg in ("-h", "--help"):
            continue
        if not arg.startswith("--"):
            continue  # a value of the previous flag (`--key value` form)
        key = arg[2:].split("=", 1)[0]
        if key not in paths:
            raise _unknown_key_error(key, paths, "the command line")
    _check_choices(cls, file_values)
    _check_choices(cls, _override_values(overrides))
    _check_list_values(cls, file_values, f"config file '{config_path}'")
    _check_list_values(cls, _override_values(overrides), "the command line")
    _check_list_items(cls, file_values, f"config file '{config_path}'")
    _check_list_items(cls, _override_values(overrides), "the command line")
    overrides = _quote_string_values(cls, overrides)
    try:
        return draccus.parse(cls, config_path=config_path, args=overrides)
    except draccus.utils.DecodingError as error:  # e.g. a string where a number belongs
        cause = _user_error_cause(error)  # a section's validate() raised it inside draccus
        if cause is not None:
            raise cause from None
        raise UserError(f"invalid config value: {error}") from None
    except draccus.utils.ParsingError as error:  # a dataclass refused its values
        cause = _user_error_cause(error)
        if cause is not None:
            raise cause from None
        reason = error.__cause__ or error
        raise UserError(f"invalid config value: {str(reason).splitlines()[0]}") from None
    except yaml.YAMLError as error:  # draccus reads values as YAML: "a: b" needs quoting
        raise UserError(
            f"a command-line value is not valid YAML ({str(error).splitlines()[0]}); quote values that "
            "contain ': ', e.g. --data.prompt_template='\"Dialogue: {dialogue}\"'."
        ) from None
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            raise
        raise UserError(
            "invalid command-line arguments (see the message above and --help)."
        ) from None


def _leaf_hints(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type hint of every leaf field of a nested dataclass."""
    hints, found = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_leaf_hints(hints[f.name], f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = hints[f.name]
    return found


def _override_values(overrides: Sequence[str]) -> dict[str, Any]:
    """{key: value} of `--key=value` and `--key value` arguments (values as typed)."""
    values, items = {}, list(overrides)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or arg in ("-h", "--help"):
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value and items and not items[0].startswith("--"):
            value, has_value = items.pop(0), True
        if has_value:
            values[key] = value.strip("'\"")
    return values


def _check_choices(cls: type, values: dict[str, Any]) -> None:
    """Enumerated keys get our one-line message, before draccus (whose argparse error for a
    bad choice is a usage block) sees them."""
    hints = _leaf_hints(cls)
    for key, value in values.items():
        if key in hints:
            check_choice(key, value, hints[key])


def _user_error_cause(error: BaseException) -> UserError | None:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, UserError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def config_to_yaml(cfg: Any) -> str:
    buffer = io.StringIO()
    draccus.dump(cfg, buffer)
    return buffer.getvalue()


def write_resolved_config(cfg: Any, path: Path, header: str = "") -> None:
    """Write the fully resolved config atomically (a reader never sees half a file)."""
    write_text_atomic(path, header + config_to_yaml(cfg))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    return draccus.decode(cls, data)


def flat_config(cfg: Any) -> dict[str, Any]:
    """{"train.learning_rate": 1e-05, ...}: the resolved config for experiment trackers."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(yaml.safe_load(config_to_yaml(cfg)), "")
    return flat
