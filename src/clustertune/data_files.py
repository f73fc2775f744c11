"""Reading a local data file or a hub split and refusing what cannot be trained on, with the
row named: bytes that are not UTF-8, malformed JSON lines, missing columns, null / empty /
non-text values (or skipping such rows with data.skip_invalid_rows)."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from clustertune.errors import UserError, is_main_process

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


def text_problem(value: Any) -> str | None:
    """Why a value cannot be a prompt or target text; None when it can."""
    if value is None:
        return "is null or missing"
    if not isinstance(value, str):
        kind = {bool: "true/false", int: "a number", float: "a number", list: "a list"}
        return f"holds {kind.get(type(value), 'an object')} ({str(value)[:30]}), not text"
    if not value.strip():
        return "is empty"
    return None


# Each row's position in its file, added when rows before it are skipped, so that later
# messages (and `clustertune-data inspect`) still name the file's row.
ROW_COLUMN = "_clustertune_row"

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
                if (reason := text_problem(values[column][row])) is not None
            ),
            None,
        )
        if problem is None and any_of:
            cells = [(column, values[column][row]) for column in any_of]
            problem = next(
                (
                    (column, text_problem(value) or "")
                    for column, value in cells
                    if value is not None and not isinstance(value, str)
                ),
                None,
            )
            if problem is None and all(text_problem(value) for _, value in cells):
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
    problems: str | None = None,
    first_row: int | None = None,
) -> datasets.Dataset:
    """Without `skip`: one error naming the first bad row and how many there are. With it:
    the split without them, and one line on the main process saying how many were skipped.
    `problems` says what is wrong with such rows (default: their text values); `first_row`:
    the first one's row in its file, where positions in `dataset` are not (a shard of it)."""
    if invalid is None:
        return dataset
    columns = "/".join(f"'{c}'" for c in invalid.columns)
    problems = problems or f"null, missing, empty or non-text values in {columns}"
    count = f"{len(invalid.rows)} of {len(dataset)} rows"
    if not skip:
        row = invalid.rows[0] if first_row is None else first_row
        first = invalid.describe_first(row_location(source, row))
        raise UserError(
            f"{what}: '{source}' {first}; {count} have {problems}: fix the data, or set "
            f"{key}=true to skip them."
        )
    if is_main_process():  # every rank loads the data; say it once
        print(f"{what}: skipped {count} of '{source}' with {problems} ({key}=true)", flush=True)
    bad = set(invalid.rows)
    if ROW_COLUMN not in dataset.column_names and "row" not in dataset.column_names:
        dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    return dataset.select([row for row in range(len(dataset)) if row not in bad])


def _first_bad_line(path: Path, row_problem: Callable[[dict], str | None]) -> str | None:
    """'file:line: problem' of the first JSON line `row_problem` objects to, for a file that
    datasets could not load (rows whose values have different types)."""
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip() and (problem := row_problem(json.loads(line))):
                return f"{path}:{line_number}: {problem}"
    return None


def _json_records(path: Path) -> Iterator[dict]:
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        return
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, list) or not all(isinstance(r, dict) for r in document):
        raise UserError(
            f"'{path}' is not a JSON array of objects; give one (or JSON Lines, a .jsonl file)."
        )
    yield from document


def _rows_as_json_text(path: str, json_columns: tuple[str, ...]) -> Iterator[dict]:
    """Rows of a JSON file with `json_columns` as the JSON text of each value (None where
    absent): nested values reach the consumer exactly as written, never as an Arrow struct
    holding the union of every row's keys, and never refused for differing between rows."""
    for record in _json_records(Path(path)):
        yield {
            **{k: v for k, v in record.items() if k not in json_columns},
            **{
                column: None if record.get(column) is None else json.dumps(record[column])
                for column in json_columns
            },
        }


def _load_json_keeping_columns(path: Path, json_columns: Sequence[str]) -> datasets.Dataset:
    """A local JSON/JSON Lines file with `json_columns` kept as JSON text (_rows_as_json_text),
    cached by datasets under a fingerprint of the file's identity (path, size, mtime)."""
    import hashlib

    stat = path.stat()
    identity = json.dumps(
        ["json-columns-1", str(path.resolve()), stat.st_size, stat.st_mtime_ns, list(json_columns)]
    )
    dataset = datasets.Dataset.from_generator(
        _rows_as_json_text,
        # a tuple: datasets would take a list as shards, one generator call per item
        gen_kwargs={"path": str(path), "json_columns": tuple(json_columns)},
        fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:32],
    )
    # a column no row has is absent, as datasets' own reader would leave it
    absent = [c for c in json_columns if all(v is None for v in dataset[c])]
    return dataset.remove_columns(absent) if absent else dataset


def load_split(
    file_or_dataset: str,
    *,
    split: str,
    required_columns: Sequence[str],
    what: str,
    skip_invalid_rows: bool = False,
    text_columns: Sequence[str] | None = None,
    row_problem: Callable[[dict], str | None] | None = None,
    json_columns: Sequence[str] = (),
    column_keys: dict[str, str] | None = None,
) -> datasets.Dataset:
    """Load a local jsonl/json/csv/parquet file or a hub dataset split, then validate it.

    `what` names the config key the input came from, so errors point at the right knob.
    `text_columns` (default: `required_columns`) must hold non-empty text in every row: a
    row that does not is refused, or skipped with `skip_invalid_rows` (find_invalid_rows).
    `row_problem` (a raw JSON row -> why it is unusable) names the line when a .jsonl cannot
    be loaded at all. `json_columns` of a local JSON file are kept as each row's JSON text
    (conversations and tools: see _rows_as_json_text). `column_keys` names the setting behind
    a required column ({column: key}), for the message when it is missing.
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
            if json_columns and LOCAL_FORMATS[suffix] == "json":
                dataset = _load_json_keeping_columns(path, json_columns)
            else:
                dataset = datasets.load_dataset(
                    LOCAL_FORMATS[suffix], data_files=str(path), split="train"
                )
        except UserError:
            raise
        except Exception as error:  # datasets raises many types for unreadable files
            if "corresponds to no data" in str(error) or path.stat().st_size == 0:
                raise UserError(f"{what}: '{file_or_dataset}' has no examples.") from None
            if row_problem is not None and suffix == ".jsonl":
                bad_line = _first_bad_line(path, row_problem)
                if bad_line:
                    raise UserError(
                        f"{what}: {bad_line}; fix that line (its values have other types than the "
                        "other rows', so the file cannot be loaded and the row cannot be skipped)."
                    ) from None
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
    keys = [column_keys[c] for c in missing if column_keys and c in column_keys]
    if keys:
        raise UserError(
            f"{what}: '{file_or_dataset}' has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(dataset.column_names)}); set {' / '.join(keys)} to the "
            "column that holds them."
        )
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
