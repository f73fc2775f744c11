"""Loading, validating and tokenising (source, target) text pairs, and collating batches.

Two model kinds share everything here except how an example becomes tensors:
- seq2seq (T5, BART): `input_ids` is the prompt; `labels` is the summary (+ EOS).
- causal (decoder-only): `input_ids` is prompt + summary + EOS; `labels` masks the prompt
  with -100 so only summary tokens are trained.
Labels are always padded with -100, never with the pad id (the seed tutorial trained on
padding that way).
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from clustertune.errors import UserError, is_main_process

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


TEXT_FORMATS = {".jsonl", ".json", ".csv"}
_CHUNK = 1 << 20


def _check_utf8(path: Path, what: str) -> None:
    """Fail on the first byte that is not UTF-8, naming its line (datasets says only "An
    error occurred while generating the dataset"). Streamed: the file may be large."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line = lines_before + chunk[: error.start].count(b"\n") + 1
                byte = chunk[error.start : error.start + 1].hex()
                raise UserError(
                    f"{what}: '{path}' is not UTF-8 text (byte 0x{byte} on line {line}, the row "
                    "there); it is probably Latin-1/cp1252: convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`."
                ) from None
            lines_before += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(
                f"{what}: '{path}' is not UTF-8 text (it ends inside a character); convert it "
                "to UTF-8."
            ) from None


def _check_jsonl(path: Path) -> None:
    """Fail on the first malformed line with its number (datasets' own error hides it)."""
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if line_number == 1 and line.strip() in (b"[", b"{"):
                    raise UserError(_one_document_message(path, line.strip())) from None
                raise UserError(
                    f"{path}:{line_number}: malformed JSON line ({error.__class__.__name__}: "
                    f"{str(error).splitlines()[0]}); fix or remove that line."
                ) from None
            if isinstance(record, list):
                raise UserError(_one_document_message(path, b"["))
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object per line.")


def _one_document_message(path: Path, opening: bytes) -> str:
    """A .jsonl holding one (pretty-printed) JSON document instead of one object per line."""
    if opening == b"[":
        return (
            f"{path} holds one JSON array, not JSON Lines (one object per line); rename it to "
            f"{path.with_suffix('.json').name} (a .json file may hold an array of objects)."
        )
    return (
        f"{path}:1: a pretty-printed JSON object, not JSON Lines; write one object per line "
        "(e.g. `jq -c . FILE`), or give a .json file holding an array of objects."
    )


def _text_problem(value: Any) -> str | None:
    """Why a value cannot be a prompt or target text; None when it can."""
    if value is None:
        return "is null or missing"
    if not isinstance(value, str):
        kind = {bool: "true/false", int: "a number", float: "a number", list: "a list"}
        return f"holds {kind.get(type(value), 'an object')} ({str(value)[:30]}), not text"
    if not value.strip():
        return "is empty"
    return None


ALL_EMPTY = "are all null or empty"  # the problem of a row none of whose `any_of` columns is text


@dataclass(frozen=True)
class InvalidRows:
    """Rows of a split whose text cannot be trained or evaluated on."""

    rows: list[int]  # 0-based positions in the dataset
    first_column: str  # the first bad row's offending column
    first_problem: str  # e.g. "is null or missing"
    columns: tuple[str, ...]  # every column that was checked

    def describe_first(self, location: str) -> str:
        return f"{location}: '{self.first_column}' {self.first_problem}"


def find_invalid_rows(
    dataset: datasets.Dataset, required: Sequence[str], any_of: Sequence[str] = ()
) -> InvalidRows | None:
    """Rows where a `required` column is not non-empty text, or where no `any_of` column is
    (and none holds a non-text value): e.g. prompt columns and target, or reference columns
    of which an example may fill only some. None when every row is valid."""
    values = dataset.select_columns([*dict.fromkeys([*required, *any_of])]).to_dict()  # decoded
    bad: list[int] = []
    first: tuple[str, str] | None = None
    for row in range(len(dataset)):
        problem = next(
            (
                (column, reason)
                for column in required
                if (reason := _text_problem(values[column][row])) is not None
            ),
            None,
        )
        if problem is None and any_of:
            cells = [(column, values[column][row]) for column in any_of]
            problem = next(
                (
                    (column, _text_problem(value) or "")
                    for column, value in cells
                    if value is not None and not isinstance(value, str)
                ),
                None,
            )
            if problem is None and all(_text_problem(value) for _, value in cells):
                problem = ("/".join(any_of), ALL_EMPTY)
        if problem is not None:
            bad.append(row)
            first = first or problem
    if not bad or first is None:
        return None
    return InvalidRows(bad, first[0], first[1], (*required, *any_of))


def row_location(source: str, row: int) -> str:
    """Where 0-based row `row` of a loaded split is in its file: the line of a .jsonl or .csv
    (blank lines and cells spanning lines counted as the readers count them), else the index."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        with path.open("rb") as handle:
            seen = -1
            for line_number, line in enumerate(handle, start=1):
                seen += bool(line.strip())
                if seen == row:
                    return f"line {line_number}"
    if path.is_file() and suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader, None)  # the header
            for index, _ in enumerate(reader):
                if index == row:
                    return f"line {reader.line_num}"
    return f"row {row} (0-based)"


def refuse_or_skip_invalid_rows(
    dataset: datasets.Dataset,
    invalid: InvalidRows | None,
    *,
    source: str,
    what: str,
    skip: bool,
    key: str = "data.skip_invalid_rows",
) -> datasets.Dataset:
    """Without `skip`: one error naming the first bad row and how many there are. With it:
    the split without them, and one line on the main process saying how many were skipped."""
    if invalid is None:
        return dataset
    columns = "/".join(f"'{c}'" for c in invalid.columns)
    count = f"{len(invalid.rows)} of {len(dataset)} rows"
    if not skip:
        first = invalid.describe_first(row_location(source, invalid.rows[0]))
        raise UserError(
            f"{what}: '{source}' {first}; {count} have null, missing, empty or non-text "
            f"values in {columns}: fix the data, or set {key}=true to skip them."
        )
    if is_main_process():  # every rank loads the data; say it once
        print(
            f"{what}: skipped {count} of '{source}' with null, missing, empty or non-text "
            f"{columns} ({key}=true)",
            flush=True,
        )
    bad = set(invalid.rows)
    return dataset.select([row for row in range(len(dataset)) if row not in bad])


def load_split(
    file_or_dataset: str,
    *,
    split: str,
    required_columns: Sequence[str],
    what: str,
    skip_invalid_rows: bool = False,
    text_columns: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Load a local jsonl/json/csv/parquet file or a hub dataset split, then validate it.

    `what` names the config key the input came from, so errors point at the right knob.
    `text_columns` (default: `required_columns`) must hold non-empty text in every row: a
    row that does not is refused, or skipped with `skip_invalid_rows` (find_invalid_rows).
    """
    path = Path(file_or_dataset).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
        example = f" (it holds {', '.join(found[:3])})" if found else ""
        raise UserError(
            f"{what}: '{file_or_dataset}' is a folder; give one data file in it{example}: "
            f"{', '.join(sorted(LOCAL_FORMATS))}."
        )
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            from clustertune.smoke import missing_smoke_asset_hint

            hint = missing_smoke_asset_hint(file_or_dataset) or "check the path."
            raise UserError(f"{what}: file '{file_or_dataset}' does not exist; {hint}")
        if suffix not in LOCAL_FORMATS:
            raise UserError(
                f"{what}: '{file_or_dataset}' has an unsupported extension; use one of "
                f"{', '.join(sorted(LOCAL_FORMATS))}."
            )
        if suffix in TEXT_FORMATS:
            _check_utf8(path, what)
        if suffix == ".jsonl":
            _check_jsonl(path)
        try:
            dataset = datasets.load_dataset(
                LOCAL_FORMATS[suffix], data_files=str(path), split="train"
            )
        except Exception as error:  # datasets raises many types for unreadable files
            if "corresponds to no data" in str(error) or path.stat().st_size == 0:
                raise UserError(f"{what}: '{file_or_dataset}' has no examples.") from None
            raise UserError(f"{what}: cannot read '{path}': {str(error).splitlines()[0]}") from None
    else:
        try:
            dataset = datasets.load_dataset(file_or_dataset, split=split)
        except Exception as error:
            raise UserError(
                f"{what}: cannot load hub dataset '{file_or_dataset}' split '{split}' "
                f"({str(error).splitlines()[0]}); check the id and split, or that it is in the "
                "HF cache when offline."
            ) from None
    missing = [c for c in required_columns if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{what}: '{file_or_dataset}' has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(dataset.column_names)}); set data.source_column / "
            "data.target_column / data.prompt_template to match."
        )
    if len(dataset) == 0:
        raise UserError(f"{what}: '{file_or_dataset}' (split '{split}') has no examples.")
    text = required_columns if text_columns is None else text_columns
    invalid = find_invalid_rows(dataset, text) if text else None
    dataset = refuse_or_skip_invalid_rows(
        dataset, invalid, source=file_or_dataset, what=what, skip=skip_invalid_rows
    )
    if len(dataset) == 0:
        raise UserError(f"{what}: '{file_or_dataset}' has no valid examples left to use.")
    return dataset


@dataclass(frozen=True)
class TokenizeSpec:
    kind: str  # "seq2seq" | "causal"
    prompt_template: str
    target_column: str
    max_source_length: int
    max_target_length: int


def _truncate(ids: list[int], max_length: int, keep_last: int | None) -> list[int]:
    """Cut to max_length, keeping a trailing special token (EOS) if the tokenizer added one."""
    if len(ids) <= max_length:
        return ids
    if keep_last is not None and ids[-1] == keep_last:
        return ids[: max_length - 1] + [keep_last]
    return ids[:max_length]


def tokenize_dataset(
    dataset: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec, num_proc: int = 1
) -> datasets.Dataset:
    """Tokenise with datasets.map (cached on disk by fingerprint, so ranks > 0 reuse it)."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        prompts = [spec.prompt_template.format(**row) for row in rows]
        targets = [str(row[spec.target_column]) for row in rows]
        out: dict[str, list] = {
            k: []
            for k in (
                "input_ids",
                "labels",
                "num_source_tokens",
                "num_target_tokens",
                "source_truncated",
                "target_truncated",
            )
        }
        if spec.kind == "seq2seq":
            sources = tokenizer(prompts)["input_ids"]
            labels = tokenizer(text_target=targets)["input_ids"]
            for src, tgt in zip(sources, labels, strict=True):
                src_t = _truncate(src, spec.max_source_length, eos)
                tgt_t = _truncate(tgt, spec.max_target_length, eos)
                out["input_ids"].append(src_t)
                out["labels"].append(tgt_t)
                out["num_source_tokens"].append(len(src_t))
                out["num_target_tokens"].append(len(tgt_t))
                out["source_truncated"].append(len(src) > len(src_t))
                out["target_truncated"].append(len(tgt) > len(tgt_t))
        else:
            sources = tokenizer(prompts)["input_ids"]
            bodies = tokenizer(targets, add_special_tokens=False)["input_ids"]
            for src, body in zip(sources, bodies, strict=True):
                tgt = body + [eos]
                src_t = _truncate(src, spec.max_source_length, None)
                tgt_t = _truncate(tgt, spec.max_target_length, eos)
                out["input_ids"].append(src_t + tgt_t)
                out["labels"].append([IGNORE_INDEX] * len(src_t) + tgt_t)
                out["num_source_tokens"].append(len(src_t))
                out["num_target_tokens"].append(len(tgt_t))
                out["source_truncated"].append(len(src) > len(src_t))
                out["target_truncated"].append(len(tgt) > len(tgt_t))
        return out

    return dataset.map(
        encode,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        desc="tokenising",
    )


def truncation_report(tokenized: datasets.Dataset, name: str, spec: TokenizeSpec) -> str:
    sources = sum(tokenized["source_truncated"])
    targets = sum(tokenized["target_truncated"])
    return (
        f"{name}: {len(tokenized)} examples; {sources} prompts truncated to "
        f"{spec.max_source_length} tokens, {targets} targets truncated to {spec.max_target_length}"
    )


@dataclass
class Collator:
    """Dynamic padding to the longest example in the micro-batch.

    For seq2seq it also builds `decoder_input_ids` (labels shifted right behind the decoder
    start token), so the model never sees -100 and the loss is computed by the caller.
    """

    pad_token_id: int
    decoder_start_token_id: int | None = None  # set for seq2seq models

    def _pad(self, rows: Sequence[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = self._pad([e["input_ids"] for e in examples], self.pad_token_id)
        attention_mask = self._pad([[1] * len(e["input_ids"]) for e in examples], 0)
        labels = self._pad([e["labels"] for e in examples], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.decoder_start_token_id is not None:
            decoder_input_ids = torch.full_like(labels, self.pad_token_id)
            decoder_input_ids[:, 0] = self.decoder_start_token_id
            decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(
                labels[:, :-1] == IGNORE_INDEX, self.pad_token_id
            )
            batch["decoder_input_ids"] = decoder_input_ids
        return batch


def batch_token_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, padded slots) over inputs and labels, for padding efficiency."""
    real, slots = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    if "decoder_input_ids" in batch:  # seq2seq: the decoder side pads too (causal: labels
        # share their positions with the inputs)
        real += int((batch["labels"] != IGNORE_INDEX).sum())
        slots += batch["labels"].numel()
    return real, slots
