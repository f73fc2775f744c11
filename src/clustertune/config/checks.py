"""The rules config values follow, in one place: Literal choices (checked the same way for
YAML, the command line and code), the Validated base of every config section, and the small
range and template checks the sections' validate() methods use."""

from __future__ import annotations

import dataclasses
import difflib
import string
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from clustertune.errors import UserError

SEED_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


# Enumerated keys. Aliases, not `Literal[...]` written in the field: draccus reads a field's
# help from the comment above it and loses it on an annotation with brackets and quotes.
Precision = Literal["auto", "bf16", "fp32", "fp16"]


LrSchedule = Literal["linear", "cosine", "constant"]


PeftMethod = Literal["none", "lora"]


Auto = Literal["auto"]  # with int: a number, or found at start-up


DataFormat = Literal["text", "chat"]


TrainOn = Literal["assistant", "last_assistant", "all"]


MixtureWeights = Literal["examples", "tokens"]


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
    if value is None and type(None) in get_args(hint):
        return  # an optional choice left unset
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


def check_source_placeholder(template: str, source_column: str) -> None:
    if source_column not in template_fields(template):
        raise UserError(
            f"data.prompt_template has no {{{source_column}}} placeholder for "
            f"data.source_column='{source_column}'; add it to the template."
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


def check_date(key: str, value: str) -> None:
    from datetime import datetime

    try:
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise UserError(
            f"{key}={value!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-01-31."
        ) from None
