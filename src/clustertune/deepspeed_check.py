"""Check a DeepSpeed JSON with DeepSpeed's own config model, before any compute, and turn its
complaint into one line naming the key and the nearest valid one."""

from __future__ import annotations

import json
import re
from collections.abc import KeysView
from typing import Any

import torch

from clustertune.distributed import deepspeed_config_path
from clustertune.errors import UserError

TOP_LEVEL_KEYS_READ_ELSEWHERE = {"sequence_parallel_size", "data_parallel_size"}


def _where() -> str:
    path = deepspeed_config_path()
    return f"the DeepSpeed config '{path}'" if path else "the DeepSpeed config"


class _ReadRecorder(dict):
    """A dict that notes which keys are looked up, by any of the ways DeepSpeed looks."""

    def __init__(self, *args: Any, read: set[str]) -> None:
        super().__init__(*args)
        self.read = read  # shared with the copy DeepSpeedConfig makes (copy.copy keeps __dict__)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> KeysView:  # `key in d.keys()` then goes through __contains__
        return KeysView(self)


def validate_deepspeed_config(config: dict) -> None:
    """Parse the (filled) JSON with DeepSpeed's own DeepSpeedConfig, before any compute, and turn
    its first complaint into one line that names the key and the nearest valid one.

    DeepSpeed's pydantic section models (zero_optimization, fp16, bf16, ...) forbid unknown keys
    and check values; its top level has no model and silently ignores an unknown key, so the
    keys its parser looks up are recorded and any other key is reported. DeepSpeed checks
    optimizer / scheduler names only when it builds them (with a traceback), so they are
    checked here against the names it accepts.
    """
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    if not isinstance(config.get("zero_optimization", {}), dict):
        raise UserError(f'{_where()}: zero_optimization must be a section, e.g. {{"stage": 2}}.')
    read: set[str] = set()
    # train_batch_size is left for DeepSpeed to derive: before the process group exists it
    # assumes one rank, and the launcher's world size is checked by the batch arithmetic.
    parsed = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(_ReadRecorder(parsed, read=read))
    except pydantic.ValidationError as error:
        raise UserError(_describe_validation_error(error, config)) from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"{_where()} is refused by DeepSpeed: {str(error).strip()}") from None
    if "train_micro_batch_size_per_gpu" in read:  # the recording worked (DeepSpeed always reads it)
        known = read | TOP_LEVEL_KEYS_READ_ELSEWHERE | {"train_batch_size"}
        for key in config:
            if key not in known:
                hint = _nearest(key, sorted(k for k in known if isinstance(k, str)))
                fix = f"did you mean '{hint}'?" if hint else "remove it."
                raise UserError(
                    f"{_where()} has an unknown top-level key '{key}' (DeepSpeed would ignore "
                    f"it); {fix}"
                )
    if "zero_optimization" not in config:
        raise UserError(
            f"{_where()} has no zero_optimization section (accelerate requires one); add e.g. "
            '"zero_optimization": {"stage": 2}.'
        )
    _check_block_type(config, "optimizer", _optimizer_names())
    _check_block_type(config, "scheduler", _scheduler_names())


def _nearest(name: str, candidates: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _optimizer_names() -> list[str]:
    """What DeepSpeed builds from optimizer.type: its own (any case) or a torch.optim class."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    torch_names = [
        name
        for name in dir(torch.optim)
        if isinstance(getattr(torch.optim, name), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name != "Optimizer"
    ]
    return [*DEEPSPEED_OPTIMIZERS, *torch_names]


def _scheduler_names() -> list[str]:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return list(VALID_LR_SCHEDULES)


def _check_block_type(config: dict, block: str, valid: list[str]) -> None:
    if block not in config:
        return
    section = config[block]
    kind = section.get("type") if isinstance(section, dict) else None
    if not isinstance(kind, str):
        raise UserError(
            f'{_where()}: the {block} block needs a "type" (one of {", ".join(valid[:6])}, ...).'
        )
    accepted = kind.lower() if block == "optimizer" and kind.lower() in valid else kind
    if accepted not in valid:
        hint = _nearest(kind, valid) or _nearest(kind.lower(), valid)
        fix = f"did you mean '{hint}'?" if hint else f"use one of {', '.join(valid)}."
        raise UserError(f"{_where()}: {block}.type '{kind}' is not one DeepSpeed knows; {fix}")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise UserError(f"{_where()}: {block}.params must be a section of named values.")


def _describe_validation_error(error: Any, config: dict) -> str:
    """One line for the first error of a DeepSpeed section model: the dotted key in the user's
    JSON, what is wrong, and for an unknown key the nearest field of that model."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    section = _locate(config, loc, first.get("input"))
    dotted = ".".join((*section, *loc))
    if first["type"] == "extra_forbidden":
        fields = _model_fields(error.title, loc[:-1])
        hint = _nearest(loc[-1], fields)
        fix = (
            f"did you mean '{'.'.join((*section, *loc[:-1], hint))}'?"
            if hint
            else f"valid keys there: {', '.join(fields)}."
        )
        return f"{_where()} has an unknown key '{dotted}'; {fix}"
    value = json.dumps(first.get("input"), default=str)
    if first["type"] == "enum":  # e.g. ZeroStageEnum lists 3 twice (max_stage is an alias)
        choices = re.split(r", | or ", first.get("ctx", {}).get("expected", ""))
        return f"{_where()}: {dotted}={value} is invalid; use one of {', '.join(dict.fromkeys(choices))}."
    return f"{_where()}: {dotted}={value} is invalid: {first['msg']}."


_MISSING = object()


def _locate(config: dict, loc: tuple[str, ...], value: Any) -> tuple[str, ...]:
    """Where in the user's JSON a section model's error path `loc` lies: the section whose
    subtree holds that path (with that value, when several do)."""
    found = []

    def lookup(node: Any, path: tuple[str, ...]) -> Any:
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return _MISSING
            node = node[key]
        return node

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        held = lookup(node, loc)
        if held is not _MISSING:
            found.append((held != value, len(prefix), prefix))
        for key, child in node.items():
            walk(child, (*prefix, str(key)))

    walk(config, ())
    return min(found)[2] if found else ()


def _model_fields(title: str, path: tuple[str, ...]) -> list[str]:
    """Field names (and aliases) of DeepSpeed's config model `title`, or of the model nested in
    it at `path` (e.g. DeepSpeedZeroConfig -> offload_optimizer)."""
    import typing

    import pydantic
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    models = [cls for cls in subclasses(DeepSpeedConfigModel) if cls.__name__ == title]
    if not models:
        return []
    model = models[0]
    for name in path:
        field = model.model_fields.get(name) or next(
            (f for f in model.model_fields.values() if f.alias == name), None
        )
        if field is None:
            return []
        nested = [
            arg
            for arg in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel)
        ]
        if not nested:
            return []
        model = nested[0]
    names = [
        name
        for key, field in model.model_fields.items()
        for name in (key, field.alias)
        if name and not (field.json_schema_extra or {}).get("deprecated", False)
    ]
    return sorted(set(names))
