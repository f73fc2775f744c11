"""Typed configs: nested dataclasses, YAML for values, `--section.key=value` overrides.

Parsing is draccus; this module adds what users need on top of it: `--config FILE`, unknown
keys rejected with the nearest valid name (in the YAML and on the command line), one-line
errors, and the resolved config written next to the outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
import string
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import draccus
import yaml

from clustertune.atomicio import write_text_atomic
from clustertune.errors import UserError

SEED_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "

# Enumerated keys. Aliases, not `Literal[...]` written in the field: draccus reads a field's
# help from the comment above it and loses it on an annotation with brackets and quotes.
Precision = Literal["auto", "bf16", "fp32", "fp16"]
LrSchedule = Literal["linear", "cosine", "constant"]
PeftMethod = Literal["none", "lora"]
Auto = Literal["auto"]  # with int: a number, or found at start-up


def _literal_choices(hint: Any) -> tuple[tuple[Any, ...], bool] | None:
    """(choices, a number is allowed too) for `Literal[...]` and `int | Literal[...]` hints."""
    if get_origin(hint) is Literal:
        return get_args(hint), False
    if get_origin(hint) in (Union, types.UnionType):
        literals = [arg for arg in get_args(hint) if get_origin(arg) is Literal]
        if literals:
            return tuple(c for lit in literals for c in get_args(lit)), int in get_args(hint)
    return None


def check_choice(key: str, value: Any, hint: Any) -> None:
    """The one check of an enumerated key, for values from YAML, the command line and code."""
    allowed = _literal_choices(hint)
    if allowed is None:
        return
    choices, number_ok = allowed
    if value in choices or (number_ok and isinstance(value, int) and not isinstance(value, bool)):
        return
    if number_ok and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return  # a number on the command line, decoded by draccus
    names = ", ".join(str(choice) for choice in choices)
    if number_ok:
        raise UserError(f"{key}={value!r} must be a number or {names}.")
    raise UserError(f"{key}={value!r} is not one of {names}.")


class Validated:
    """Base of every config section: `Literal` keys are checked when the section is built
    (from YAML, the command line or code), then the section's own `validate()` runs.
    `SECTION` is the dotted prefix used in messages ("train" -> "train.lr_schedule")."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        prefix = f"{self.SECTION}." if self.SECTION else ""
        for name, hint in typing.get_type_hints(type(self)).items():
            if name in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
                check_choice(prefix + name, getattr(self, name), hint)
        self.validate()

    def validate(self) -> None:
        """Checks between this section's values; override where a section has any."""


def template_fields(template: str) -> list[str]:
    """The {placeholders} of a prompt template, e.g. "Dialogue: {dialogue}" -> [dialogue]."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _stray_brace(template: str) -> tuple[str, int] | None:
    """(brace, position) of the first brace that is neither doubled nor closes a placeholder.
    str.format's own error ("Single '}' encountered") says neither which brace nor where."""
    position = 0
    while position < len(template):
        char = template[position]
        if template[position : position + 2] in ("{{", "}}"):
            position += 2
        elif char == "{":
            close = template.find("}", position)
            reopen = template.find("{", position + 1)
            if close < 0 or 0 <= reopen < close:  # never closed, or another opens first
                return "{", position
            position = close + 1
        elif char == "}":
            return "}", position
        else:
            position += 1
    return None


def check_prompt_template(template: str, key: str = "data.prompt_template") -> None:
    """Refuse what str.format would fail on (or read wrongly) inside datasets.map: a stray
    brace, a positional {} or {0}, and braces around something that is not a column name
    (e.g. a literal JSON example {"summary": ...}, which needs doubled braces)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        stray = _stray_brace(template)
        if stray is None:
            raise UserError(f"{key} is not a valid format string ({error}).") from None
        brace, position = stray
        context = template[max(0, position - 15) : position + 15].replace("\n", " ")
        raise UserError(
            f"{key} has a stray '{brace}' at character {position + 1} (...{context}...); "
            "write a literal brace doubled, '{{' or '}}', and placeholders as {column}."
        ) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        placeholder = "{" + name + (f"!{conversion}" if conversion else "")
        placeholder += (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            raise UserError(
                f"{key} has a positional placeholder '{placeholder}'; name the column instead, "
                "e.g. {dialogue}."
            )
        if not name.isidentifier():
            raise UserError(
                f"{key}: '{placeholder}' is not a column placeholder (those are bare column names, "
                f"e.g. {{dialogue}}); to write literal braces, double them: '{{{placeholder}}}'."
            )


def at_least(key: str, value: float, minimum: float, meaning: str = "") -> None:
    """`meaning`: what the smallest values do, e.g. "0 saves only when stopped by a signal"."""
    if value < minimum:
        raise UserError(
            f"{key}={value} must be at least {minimum}" + (f" ({meaning})." if meaning else ".")
        )


def in_range(key: str, value: float, low: float, high: float, *, example: float) -> None:
    """low <= value < high: the message names the interval and a typical value."""
    if not low <= value < high:
        raise UserError(f"{key}={value} must be in [{low}, {high}), e.g. {example}.")


def positive(key: str, value: float, example: float) -> None:
    if not value > 0:
        raise UserError(f"{key}={value} must be greater than 0, e.g. {example}.")


@dataclass
class ModelConfig(Validated):
    SECTION: ClassVar[str] = "model"
    # Hub id or local folder of a seq2seq (T5, FLAN-T5, BART) or decoder-only model.
    name_or_path: str = "google/flan-t5-base"
    # Overrides every dropout probability in the model config; 0 makes runs comparable step for step.
    dropout: float | None = None
    # auto: bf16 where the hardware supports it, fp32 otherwise; fp16 is refused for T5.
    dtype: Precision = "auto"
    # Recompute activations in backward: ~30% slower, activation memory O(layers) -> O(1).
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.dropout is not None:
            in_range("model.dropout", self.dropout, 0, 1, example=0.1)


@dataclass
class DataConfig(Validated):
    SECTION: ClassVar[str] = "data"

    # Local jsonl/json/csv/parquet file, or a hub dataset id (then train_split is used).
    train_file: str | None = None
    # Local file or hub dataset id for the periodic eval loss; empty disables eval.
    eval_file: str | None = None
    # Hub dataset id providing both splits (alternative to train_file/eval_file).
    dataset: str | None = None
    # Split of data.dataset to train on.
    train_split: str = "train"
    # Split of data.dataset for the periodic eval loss.
    eval_split: str = "validation"
    # Column holding the input text (the dialogue).
    source_column: str = "dialogue"
    # Column holding the target text (the summary).
    target_column: str = "summary"
    # Prompt with one {placeholder} named like source_column (the seed tutorial's prompt).
    prompt_template: str = SEED_PROMPT
    # Prompt tokens kept; DialogSum dialogues are ~160 tokens median, so 512 truncates few.
    max_source_length: int = 512
    # Summary tokens kept (DialogSum summaries are ~25 tokens median).
    max_target_length: int = 128
    # Use only the first N eval examples (None: all); keeps periodic eval cheap.
    max_eval_examples: int | None = None
    # Global batches sorted together by length: larger packs tighter, smaller is more random.
    length_group_size: int = 50
    # Processes for tokenisation with datasets.map (results are cached by datasets).
    num_proc: int = 1
    # Rows whose text (prompt columns, target) is null, missing, empty or not a string:
    # false refuses the data naming the first such row; true skips them and says how many.
    skip_invalid_rows: bool = False

    def validate(self) -> None:
        check_prompt_template(self.prompt_template)
        check_source_placeholder(self.prompt_template, self.source_column)
        at_least("data.max_source_length", self.max_source_length, 1)
        at_least("data.max_target_length", self.max_target_length, 1)
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise UserError(
                f"data.max_eval_examples={self.max_eval_examples} leaves an empty eval set; "
                "use a positive number, or null for all."
            )
        at_least("data.length_group_size", self.length_group_size, 1)
        at_least("data.num_proc", self.num_proc, 1)


def check_source_placeholder(template: str, source_column: str) -> None:
    if source_column not in template_fields(template):
        raise UserError(
            f"data.prompt_template has no {{{source_column}}} placeholder for "
            f"data.source_column='{source_column}'; add it to the template."
        )


@dataclass
class TrainConfig(Validated):
    SECTION: ClassVar[str] = "train"

    # Optimizer steps; -1 means num_epochs passes over the training data.
    max_steps: int = -1
    # Epochs when max_steps is -1.
    num_epochs: int = 1
    # Examples per optimizer step = micro_batch_size x grad_accum_steps x world_size.
    global_batch_size: int = 32
    # Examples per forward pass on one rank, or auto: the largest that fits (all ranks agree,
    # worst-case lengths, forward+backward+optimizer step). grad_accum_steps is derived from it.
    micro_batch_size: int | Auto = 8
    # auto: use at most (1 - margin) x the largest micro-batch that fitted.
    auto_batch_margin: float = 0.1
    # Peak learning rate (seed: 1e-5 full fine-tune, 1e-3 LoRA).
    learning_rate: float = 1e-5
    # Linear warmup from 0 to learning_rate.
    warmup_steps: int = 0
    # Decay after warmup, to 0 at the last step (constant: none).
    lr_schedule: LrSchedule = "linear"
    # AdamW weight decay (not applied to biases and norms).
    weight_decay: float = 0.0
    # Clip the global gradient norm to this (0 disables).
    max_grad_norm: float = 1.0
    # Eval loss every N optimizer steps (0: only before and after training).
    eval_every_steps: int = 0
    # Log a metrics line every N optimizer steps.
    log_every_steps: int = 10
    # Extra trackers for accelerate, e.g. [tensorboard]; metrics.jsonl is always written.
    report_to: list[str] = field(default_factory=list)
    # Adam's first-moment decay.
    adam_beta1: float = 0.9
    # Adam's second-moment decay.
    adam_beta2: float = 0.999
    # Added to Adam's denominator for numerical stability.
    adam_epsilon: float = 1e-8

    def validate(self) -> None:
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise UserError("set train.max_steps or train.num_epochs to a positive number.")
        in_range("train.auto_batch_margin", self.auto_batch_margin, 0, 1, example=0.1)
        positive("train.learning_rate", self.learning_rate, example=1e-5)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.max_grad_norm", self.max_grad_norm, 0)
        at_least(
            "train.eval_every_steps", self.eval_every_steps, 0, "0: only before and after training"
        )
        at_least("train.log_every_steps", self.log_every_steps, 1)
        in_range("train.adam_beta1", self.adam_beta1, 0, 1, example=0.9)
        in_range("train.adam_beta2", self.adam_beta2, 0, 1, example=0.999)
        positive("train.adam_epsilon", self.adam_epsilon, example=1e-8)
        for tracker in self.report_to:
            check_tracker_name(tracker)

    def check_trackers_installed(self) -> None:
        """Refuse a tracker whose package is missing (accelerate would only warn and run
        without it). Not part of validate(): a run's config.yaml stays readable on a machine
        without that package (evaluation reads it)."""
        from accelerate.tracking import get_available_trackers

        available = {str(tracker) for tracker in get_available_trackers()}
        for tracker in self.report_to:
            if tracker != "all" and tracker not in available:
                raise UserError(
                    f"train.report_to: the {tracker} tracker needs the '{tracker}' package, which "
                    f"is not installed; pip install {tracker}, or remove it from train.report_to."
                )


def check_tracker_name(tracker: str) -> None:
    """A name accelerate knows (its LoggerType), else the nearest one: accelerate itself
    fails on an unknown name only when the Accelerator is built, after compute has started."""
    from accelerate.utils import LoggerType

    names = LoggerType.list()
    if tracker not in names:
        close = difflib.get_close_matches(tracker, names, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"train.report_to: unknown tracker '{tracker}'; {hint}(choices: {', '.join(names)})."
        )


@dataclass
class PeftConfig(Validated):
    SECTION: ClassVar[str] = "peft"

    # none: full fine-tune; lora: train low-rank adapters only.
    method: PeftMethod = "none"
    # LoRA rank: higher adds capacity and memory (seed: 32).
    r: int = 32
    # LoRA scale numerator; the update is scaled by alpha / r.
    alpha: int = 32
    # Dropout on the LoRA input (seed: 0.05).
    dropout: float = 0.05
    # Module names to adapt; empty means ["q", "v"] for T5 and peft's defaults otherwise.
    target_modules: list[str] = field(default_factory=list)
    # Also write final/merged/: the base model with the adapter merged in.
    merge_on_save: bool = False

    def validate(self) -> None:
        at_least("peft.r", self.r, 1)
        positive("peft.alpha", self.alpha, example=32)
        in_range("peft.dropout", self.dropout, 0, 1, example=0.05)


@dataclass
class CheckpointConfig(Validated):
    SECTION: ClassVar[str] = "checkpoint"

    # Save a resumable checkpoint every N optimizer steps (0: only when stopped by a signal).
    every_steps: int = 0
    # Complete checkpoints kept; older ones are pruned after a new one is complete.
    keep_last: int = 2

    def validate(self) -> None:
        at_least("checkpoint.every_steps", self.every_steps, 0, "0: only when stopped by a signal")
        at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass
class FinetuneConfig(Validated):
    # Everything the run writes: config.yaml, metrics.jsonl, checkpoints/, final/.
    output_dir: str = "outputs/run"
    # Seeds model init (LoRA), data order and dropout.
    seed: int = 42
    # auto: continue from the newest complete checkpoint in output_dir; never; or a path.
    resume: str = "auto"
    # Resume even if model, data or global batch changed since the checkpoint.
    allow_config_change: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


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
