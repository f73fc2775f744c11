"""The eval set and how it is cut into batches: what makes the result independent of world size.

- `assign_ids`, `reference_lists`, `EvalSet`, `load_eval_set`: load the data, give every
  example a stable id and its references, and tokenise the prompts exactly as training does
  (text rows; text rendered with the chat template; conversations: prompts.py says how).
- `make_batches`: examples sorted by prompt length (longest first, ties by position) are cut
  into batches *before* anything depends on the world size; `clustertune.sampler.deal_to_ranks`
  then gives batch k to rank k % world_size, and under ZeRO-3 a rank short of batches repeats
  the last one (its outputs dropped) so every rank makes the same number of `generate` calls.
- `pad_prompts`, `count_generated`, `until_stop`: the tensors of one generate call, its token
  counts, and the new tokens each prediction decodes (up to the first stop token).
- `merge_predictions`: the (id, text) records gathered from all ranks put back in id order,
  de-duplicated, so an example can never count twice or go missing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clustertune import chat
from clustertune import data as data_lib
from clustertune.config import template_fields
from clustertune.errors import UserError
from clustertune.evaluation.config import EvalDataConfig
from clustertune.evaluation.prompts import (
    ChatExample,
    PromptStyle,
    chat_example,
    prompt_style,
    templated_prompt,
)

ID_COLUMNS = ("id", "fname")  # DialogSum's Hub copy has `id`; the official jsonl has `fname`


# ---------------------------------------------------------------------------- examples


def assign_ids(
    columns: Mapping[str, Sequence[Any]],
    num_rows: int,
    id_column: str | None = None,
    row_numbers: Sequence[int] | None = None,
) -> tuple[list[str], str]:
    """Stable example ids and where they came from: `id_column`, else the first of `id`/`fname`
    whose values are unique, else the row index. Returns (ids, source). `row_numbers`: each
    row's position in the file, where rows were skipped (data.skip_invalid_rows)."""
    if id_column is not None:
        if id_column not in columns:
            raise UserError(
                f"data.id_column='{id_column}' is not a column ({', '.join(columns)}); unset it to use row numbers."
            )
        ids = [str(value) for value in columns[id_column]]
        if len(set(ids)) != len(ids):
            duplicate = Counter(ids).most_common(1)[0][0]
            raise UserError(
                f"data.id_column='{id_column}' is not unique (e.g. '{duplicate}'); unset it to use row numbers."
            )
        return ids, id_column
    for name in ID_COLUMNS:
        if name in columns:
            ids = [str(value) for value in columns[name]]
            if len(set(ids)) == len(ids) and all(ids):
                return ids, name
    positions = range(num_rows) if row_numbers is None else row_numbers
    return [str(index) for index in positions], "row index"


def reference_lists(
    columns: Mapping[str, Sequence[Any]], reference_columns: Sequence[str], ids: Sequence[str]
) -> list[list[str]]:
    """Per example, its non-empty references in column order (the first is `first_reference`)."""
    references = []
    for row, example_id in enumerate(ids):
        texts = [
            str(columns[c][row])
            for c in reference_columns
            if columns[c][row] is not None and str(columns[c][row]).strip()
        ]
        if not texts:
            raise UserError(
                f"example '{example_id}' has no reference in {list(reference_columns)}; fix the data or data.reference_columns."
            )
        references.append(texts)
    return references


def _valid_rows(
    dataset: Any, data_cfg: EvalDataConfig, source: str, what: str, prompt_columns: Sequence[str]
) -> list[int]:
    """Positions of the rows that can be evaluated: prompt columns hold non-empty text and at
    least one reference column does (a reference that is present must be text). Others are
    refused, or skipped with data.skip_invalid_rows."""
    invalid = data_lib.find_invalid_rows(dataset, prompt_columns, data_cfg.reference_columns)
    if invalid is None:
        return list(range(len(dataset)))
    first = invalid.rows[0]
    if not data_cfg.skip_invalid_rows and invalid.first_problem == data_lib.ALL_EMPTY:
        # no reference at all: name the example by its id, as the report does
        ids, _ = assign_ids(dataset.to_dict(), len(dataset), data_cfg.id_column)
        raise UserError(
            f"example '{ids[first]}' has no reference in {list(data_cfg.reference_columns)} "
            f"({data_lib.row_location(source, first)} of '{source}'); {len(invalid.rows)} of "
            f"{len(dataset)} rows have invalid text or no reference: fix the data or "
            "data.reference_columns, or set data.skip_invalid_rows=true to skip them."
        )
    data_lib.refuse_or_skip_invalid_rows(
        dataset, invalid, source=source, what=what, skip=data_cfg.skip_invalid_rows
    )
    bad = set(invalid.rows)
    rows = [row for row in range(len(dataset)) if row not in bad]
    if not rows:
        raise UserError(f"{what}: '{source}' has no valid examples left to evaluate.")
    return rows


@dataclass
class EvalSet:
    ids: list[str]
    prompts: list[str]  # as predictions.jsonl shows them (chat: rendered with the template)
    prompt_ids: list[list[int]]  # exactly what training feeds the model (same truncation)
    references: list[list[str]]
    id_source: str
    num_truncated: int
    style: PromptStyle = PromptStyle("text")
    # chat: each example's reference reply (its tool calls, what the conversation may call);
    # empty for text sets
    examples: list[ChatExample] | None = None


def _source(data_cfg: EvalDataConfig) -> tuple[str, str]:
    """The eval data and the key that names it, for messages."""
    if data_cfg.eval_file:
        return data_cfg.eval_file, "data.eval_file"
    return str(data_cfg.dataset), "data.dataset"


def _check_reference_columns(dataset: Any, data_cfg: EvalDataConfig, source: str) -> None:
    missing = [c for c in data_cfg.reference_columns or () if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"data.reference_columns: '{source}' has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(dataset.column_names)}); set data.reference_columns to the reference summary column(s)."
        )


def load_eval_set(
    data_cfg: EvalDataConfig,
    tokenizer: Any,
    kind: str,
    model_name: str = "the model",
    enable_thinking: bool | None = None,
) -> EvalSet:
    """Load, validate and tokenise the eval data. `data_cfg` must be resolved (resolve_config).

    Raw text prompts go through data.tokenize_dataset, the training pipeline, with the first
    reference as its target: seq2seq input_ids are the prompt; causal ones are prompt + target,
    of which the first num_source_tokens are the prompt. Truncation is therefore training's, by
    construction. Prompts rendered with the chat template (conversations, or text with
    use_chat_template) are built by prompts.py, cut as training cuts them.
    """
    style = prompt_style(data_cfg, tokenizer, kind, model_name, enable_thinking)
    if style.format == "chat":
        return _load_chat_set(data_cfg, tokenizer, style)
    source, what = _source(data_cfg)
    references_from = data_cfg.reference_columns or []
    prompt_columns = template_fields(data_cfg.prompt_template)
    dataset = data_lib.load_split(
        source,
        split=data_cfg.split,
        required_columns=prompt_columns,
        what=what,
        text_columns=(),  # checked below, with the references, keeping each row's position
    )
    _check_reference_columns(dataset, data_cfg, source)
    rows = _valid_rows(dataset, data_cfg, source, what, prompt_columns)
    if data_cfg.max_examples is not None:
        rows = rows[: data_cfg.max_examples]
    if len(rows) != len(dataset):
        dataset = dataset.select(rows)
    columns = dataset.to_dict()
    ids, id_source = assign_ids(columns, len(dataset), data_cfg.id_column, row_numbers=rows)
    references = reference_lists(columns, references_from, ids)
    records = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    prompts = [data_cfg.prompt_template.format(**row) for row in records]
    if style.chat_template:  # the prompt's content cut to max_source_length tokens, as trained
        rendered = [
            templated_prompt(tokenizer, style, p, data_cfg.max_source_length) for p in prompts
        ]
        return EvalSet(
            ids,
            [text for text, _, _ in rendered],
            [prompt for _, prompt, _ in rendered],
            references,
            id_source,
            sum(cut for _, _, cut in rendered),
            style,
        )
    spec = data_lib.TokenizeSpec(
        kind,
        data_cfg.prompt_template,
        references_from[0],
        data_cfg.max_source_length,
        max_target_length=1 << 30,
    )
    tokenized = data_lib.tokenize_dataset(dataset, tokenizer, spec)
    lengths = tokenized["num_source_tokens"]
    prompt_ids = [
        ids_[:length] for ids_, length in zip(tokenized["input_ids"], lengths, strict=True)
    ]
    truncated = int(sum(tokenized["source_truncated"]))
    return EvalSet(ids, prompts, prompt_ids, references, id_source, truncated, style)


def _load_chat_set(data_cfg: EvalDataConfig, tokenizer: Any, style: PromptStyle) -> EvalSet:
    """Conversations: each prompt the conversation before its last assistant reply; the
    references that reply, or data.reference_columns. Rows that cannot be evaluated (see
    chat.parse_conversation, prompts.chat_example) are refused naming the first, or skipped."""
    source, what = _source(data_cfg)
    column, tools_column = str(data_cfg.messages_column), str(data_cfg.tools_column)

    def row_problem(record: dict) -> str | None:  # names the line of a file datasets cannot load
        problem = chat.parse_conversation(record.get(column), record.get(tools_column))
        if isinstance(problem, chat.Problem):
            return f"'{column if problem.field == 'messages' else tools_column}' {problem}"
        return None

    dataset = data_lib.load_split(
        source,
        split=data_cfg.split,
        required_columns=[column],
        what=what,
        text_columns=(),  # checked below, keeping each row's position
        row_problem=row_problem,
        json_columns=[column, tools_column],
        column_keys={column: "data.messages_column"},
    )
    _check_reference_columns(dataset, data_cfg, source)
    max_length = int(data_cfg.max_length or 0)
    tools = dataset[tools_column] if tools_column in dataset.column_names else [None] * len(dataset)
    built = [
        chat_example(tokenizer, style, messages, row_tools, max_length)
        for messages, row_tools in zip(dataset[column], tools, strict=True)
    ]
    problems = {
        row: (column if b.field == "messages" else tools_column, b)
        for row, b in enumerate(built)
        if isinstance(b, chat.Problem)
    }
    if data_cfg.reference_columns:
        invalid = data_lib.find_invalid_rows(dataset, (), data_cfg.reference_columns)
        for row in invalid.rows if invalid else ():
            problems.setdefault(row, (invalid.first_column, invalid.first_problem))
    rows = list(range(len(dataset)))
    if problems:
        bad = sorted(problems)
        first_column, first_problem = problems[bad[0]]
        checked = (column, *(data_cfg.reference_columns or ()))
        data_lib.refuse_or_skip_invalid_rows(
            dataset,
            data_lib.InvalidRows(bad, first_column, first_problem, checked),
            source=source,
            what=what,
            skip=data_cfg.skip_invalid_rows,
            problems="conversations that cannot be evaluated (malformed, refused by the "
            "template, a prompt too long for data.max_length) or no reference",
        )
        rows = [row for row in rows if row not in problems]
        if not rows:
            raise UserError(f"{what}: '{source}' has no valid examples left to evaluate.")
    if data_cfg.max_examples is not None:
        rows = rows[: data_cfg.max_examples]
    if len(rows) != len(dataset):
        dataset = dataset.select(rows)
    columns = dataset.to_dict()
    ids, id_source = assign_ids(columns, len(dataset), data_cfg.id_column, row_numbers=rows)
    examples: list[ChatExample] = [built[row] for row in rows]  # type: ignore[misc]
    if data_cfg.reference_columns:
        references = reference_lists(columns, data_cfg.reference_columns, ids)
    else:
        references = [[example.reference] for example in examples]
    return EvalSet(
        ids,
        [example.prompt for example in examples],
        [example.prompt_ids for example in examples],
        references,
        id_source,
        0,  # never cut: a prompt too long for max_length is invalid (above)
        style,
        examples,
    )


# ---------------------------------------------------------------------------- batching


def make_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Example positions cut into batches, independent of the world size. Sorted: longest
    first, ties by position (deterministic), so each batch pads to a similar length."""
    order = (
        sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        if sort_by_length
        else list(range(len(lengths)))
    )
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_prompts(rows: Sequence[list[int]], pad_token_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad to the longest prompt: left for decoder-only models (generation continues from the
    last position), right for encoder-decoders (the encoder masks padding anywhere)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def count_generated(new_tokens: torch.Tensor, eos_token_ids: Iterable[int]) -> list[int]:
    """Generated tokens per row up to and including the first EOS (the rest is padding)."""
    eos = set(eos_token_ids)
    counts = []
    for row in new_tokens.tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        counts.append(len(row) if stop is None else stop + 1)
    return counts


def until_stop(new_tokens: torch.Tensor, stop_ids: Iterable[int]) -> list[list[int]]:
    """Each row's generated tokens before its first stop token: what its prediction decodes.
    An end-of-turn marker that is not a special token (some templates' "<end>" text) would
    otherwise survive skip_special_tokens; rows of a batch that finished early are padded."""
    stop = set(stop_ids)
    rows = []
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stop), len(row))
        rows.append(row[:end])
    return rows


def merge_predictions(records: Iterable[Sequence[Any]], ids: Sequence[str]) -> list[Any]:
    """Records (id, value, ...) gathered from all ranks -> values in the order of `ids`.

    De-duplicated by id (the first record of an id wins), so an example repeated to fill a
    shard can never count twice; a missing id is an error, not a silently smaller eval set.
    """
    by_id: dict[str, Any] = {}
    for example_id, value, *_ in records:
        by_id.setdefault(example_id, value)
    missing = [example_id for example_id in ids if example_id not in by_id]
    if missing:
        raise RuntimeError(
            f"no prediction for {len(missing)} of {len(ids)} examples (e.g. {missing[:3]}) after gathering."
        )
    return [by_id[example_id] for example_id in ids]
