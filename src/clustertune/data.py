"""Tokenising (source, target) text pairs and conversations, and collating batches.

Two model kinds share everything here except how an example becomes tensors:
- seq2seq (T5, BART): `input_ids` is the prompt; `labels` is the summary (+ EOS).
- causal (decoder-only): `input_ids` is prompt + summary + EOS (or a conversation rendered
  with the chat template, chat.py); `labels` masks the prompt with -100 so only summary (or
  assistant) tokens are trained.
Labels are always padded with -100, never with the pad id (the seed tutorial trained on
padding that way). Loading and validating the files is data_files.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from clustertune.chat.encode import IGNORE_INDEX  # the label of a token with no loss
from clustertune.data_files import (  # noqa: F401  (the loading API, re-exported)
    ALL_EMPTY,
    LOCAL_FORMATS,
    ROW_COLUMN,
    InvalidRows,
    find_invalid_rows,
    load_split,
    refuse_or_skip_invalid_rows,
    row_location,
)
from clustertune.errors import UserError

# Part of every tokenisation's cache key (datasets hashes the spec, not the code it calls):
# bump it when what a row becomes changes, so no cache made by other code is read.
TOKENIZE_VERSION = 2


@dataclass(frozen=True)
class TokenizeSpec:
    kind: str  # "seq2seq" | "causal"
    prompt_template: str
    target_column: str
    max_source_length: int
    max_target_length: int
    format: str = "text"  # "text" | "chat" (data.format)
    messages_column: str = "messages"
    tools_column: str = "tools"
    train_on: str = "assistant"  # "assistant" | "last_assistant" | "all"
    max_length: int = 1024  # chat: tokens per conversation
    # the chat template rows are rendered with (chat, or text with use_chat_template); None:
    # raw text
    template: Any = None
    version: int = TOKENIZE_VERSION

    @property
    def use_chat_template(self) -> bool:
        """Text rows rendered as a user turn (the prompt) and an assistant turn (the target)."""
        return self.format == "text" and self.template is not None


def _truncate(ids: list[int], max_length: int, keep_last: int | None) -> list[int]:
    """Cut to max_length, keeping a trailing special token (EOS) if the tokenizer added one."""
    if len(ids) <= max_length:
        return ids
    if keep_last is not None and ids[-1] == keep_last:
        return ids[: max_length - 1] + [keep_last]
    return ids[:max_length]


def cut_text(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """`text` cut before its token max_tokens (at a token's first character, so the kept
    part tokenises as it did), and whether it was cut."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    if len(offsets) <= max_tokens:
        return text, False
    return text[: offsets[max_tokens][0]], True


def _counts(labels: list[int]) -> tuple[int, int]:
    """(untrained, trained) tokens of a causal example. Position 0 is never predicted (the
    loss pairs position t's logits with token t+1), so a label there is not counted: the
    loss denominator is exactly the tokens the loss sums over, packed or padded."""
    trained = sum(label != IGNORE_INDEX for label in labels[1:])
    return len(labels) - trained, trained


COLUMNS = (
    "input_ids",
    "labels",
    "num_source_tokens",  # untrained tokens (the prompt) / encoder tokens for seq2seq
    "num_target_tokens",  # tokens the loss is taken on
    "source_truncated",
    "target_truncated",
    "problem",  # why the row cannot be used ("" when it can)
    "problem_field",  # what the problem is about: messages / tools (chat) or a text column
    "row",  # the row's position in the data it was read from
)


def tokenized_features() -> datasets.Features:
    """The tokenised rows' Arrow types: token ids in int32 (vocabularies < 2**31), half the
    bytes of the int64 datasets would infer, memory-mapped or on disk."""
    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "num_source_tokens": datasets.Value("int32"),
            "num_target_tokens": datasets.Value("int32"),
            "source_truncated": datasets.Value("bool"),
            "target_truncated": datasets.Value("bool"),
            "problem": datasets.Value("string"),
            "problem_field": datasets.Value("string"),
            "row": datasets.Value("int64"),
        }
    )


def column(dataset: datasets.Dataset, name: str) -> Any:
    """One column of every row as a numpy array, read through Arrow (a row selection
    honoured): no Python object per row, whatever the size of the data."""
    import numpy as np

    return np.asarray(dataset.with_format("arrow")[name].to_numpy())


def text_row_problem(row: dict[str, Any], columns: Sequence[str]) -> tuple[str, str] | None:
    """(column, why) of the first of `columns` whose value is not non-empty text; None when
    the row can be used."""
    from clustertune.data_files import text_problem

    for column in columns:
        reason = text_problem(row.get(column))
        if reason is not None:
            return column, reason
    return None


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    spec: TokenizeSpec,
    num_proc: int = 1,
    row_offset: int = 0,
    cache_file_name: str | None = None,
) -> datasets.Dataset:
    """Tokenise with datasets.map (cached on disk by fingerprint, so ranks > 0 reuse it).
    Every row gives one output row, in order: its tokens, or (a row that cannot be used) its
    `problem`, which refuse_or_skip_unusable refuses or skips afterwards. `row` is the row's
    position in its data (`row_offset`: of the first row, for a shard of it)."""
    from clustertune import chat
    from clustertune.config import template_fields

    eos = tokenizer.eos_token_id
    text_columns = [*template_fields(spec.prompt_template), spec.target_column]

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        out: dict[str, list] = {k: [] for k in COLUMNS}

        def add(
            position: int,
            ids: list[int],
            labels: list[int],
            counts: tuple[int, int],
            cut: tuple[bool, bool],
            problem: tuple[str, str] = ("", ""),
        ) -> None:
            row = rows[position].get(ROW_COLUMN, indices[position] + row_offset)
            values = (ids, labels, *counts, *cut, *problem, row)
            for column, value in zip(COLUMNS, values, strict=True):
                out[column].append(value)

        def refuse(position: int, problem: str, field: str) -> None:
            add(position, [], [], (0, 0), (False, False), (problem, field))

        if spec.format == "chat":
            for position, row in enumerate(rows):
                conversation = chat.parse_conversation(
                    row[spec.messages_column], row.get(spec.tools_column)
                )
                rendered = conversation
                if not isinstance(conversation, chat.Problem):
                    rendered = chat.encode_conversation(
                        tokenizer,
                        spec.template,
                        conversation,
                        train_on=spec.train_on,
                        max_length=spec.max_length,
                    )
                if isinstance(rendered, chat.Problem):  # refused or skipped after the map
                    refuse(position, str(rendered), rendered.field)
                    continue
                add(
                    position,
                    rendered.input_ids,
                    rendered.labels,
                    _counts(rendered.labels),
                    (rendered.truncated, False),
                )
            return out
        problems = [text_row_problem(row, text_columns) for row in rows]
        valid = [position for position, problem in enumerate(problems) if problem is None]
        prompts = [spec.prompt_template.format(**rows[p]) for p in valid]
        targets = [str(rows[p][spec.target_column]) for p in valid]
        encoded: dict[int, tuple] = {}
        if spec.kind == "seq2seq":
            sources = tokenizer(prompts)["input_ids"] if valid else []
            labels = tokenizer(text_target=targets)["input_ids"] if valid else []
            for position, src, tgt in zip(valid, sources, labels, strict=True):
                src_t = _truncate(src, spec.max_source_length, eos)
                tgt_t = _truncate(tgt, spec.max_target_length, eos)
                encoded[position] = (
                    src_t,
                    tgt_t,
                    (len(src_t), len(tgt_t)),
                    (len(src) > len(src_t), len(tgt) > len(tgt_t)),
                )
        elif spec.use_chat_template:
            for position, prompt, target in zip(valid, prompts, targets, strict=True):
                prompt, prompt_cut = cut_text(tokenizer, prompt, spec.max_source_length)
                target, target_cut = cut_text(tokenizer, target, spec.max_target_length)
                turns = chat.Conversation(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
                )
                rendered = chat.encode_conversation(
                    tokenizer, spec.template, turns, train_on=spec.train_on, max_length=1 << 30
                )
                if isinstance(rendered, chat.Problem):  # the template itself fails: nothing trains
                    raise UserError(f"data.use_chat_template: a prompt/target pair {rendered}.")
                encoded[position] = (
                    rendered.input_ids,
                    rendered.labels,
                    _counts(rendered.labels),
                    (prompt_cut, target_cut),
                )
        else:
            sources = tokenizer(prompts)["input_ids"] if valid else []
            bodies = tokenizer(targets, add_special_tokens=False)["input_ids"] if valid else []
            for position, src, body in zip(valid, sources, bodies, strict=True):
                tgt = body + [eos]
                src_t = _truncate(src, spec.max_source_length, None)
                tgt_t = _truncate(tgt, spec.max_target_length, eos)
                labels = [IGNORE_INDEX] * len(src_t) + tgt_t
                if spec.train_on == "all":
                    labels = src_t + tgt_t
                encoded[position] = (
                    src_t + tgt_t,
                    labels,
                    _counts(labels),
                    (len(src) > len(src_t), len(tgt) > len(tgt_t)),
                )
        for position, problem in enumerate(problems):
            if problem is None:
                add(position, *encoded[position])
            else:
                column, reason = problem
                refuse(position, reason, column)
        return out

    return dataset.map(
        encode,
        batched=True,
        with_indices=True,
        features=tokenized_features(),
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        desc="tokenising",
        cache_file_name=cache_file_name,
    )


CHAT_PROBLEMS = (
    "conversations that cannot be used (malformed, refused by the template, or too long)"
)


def problem_positions(tokenized: datasets.Dataset) -> list[int]:
    """Positions of the rows tokenize_dataset marked unusable (read in Arrow, without making
    a Python list of every row's problem)."""
    import pyarrow.compute as pc

    problems = tokenized.with_format("arrow")["problem"]
    return pc.indices_nonzero(pc.not_equal(problems, "")).to_pylist()


def refuse_or_skip_unusable(
    tokenized: datasets.Dataset,
    *,
    source: str,
    what: str,
    skip: bool,
    columns: dict[str, str],
    problems: str | None = None,
) -> datasets.Dataset:
    """Rows tokenize_dataset marked unusable (bad text values; chat: bad structure, a row the
    template refuses, too long): one error naming the first by its file line, or skipped and
    counted with data.skip_invalid_rows. `columns` names the data column of each problem field
    (chat: messages and tools); `problems` says what such rows are (data_files' wording)."""
    bad = problem_positions(tokenized)
    if bad:
        first = tokenized[bad[0]]
        field = first["problem_field"]
        checked = tuple(dict.fromkeys(columns.values()))
        invalid = InvalidRows(bad, columns.get(field, field), first["problem"], checked)
        tokenized = refuse_or_skip_invalid_rows(
            tokenized,
            invalid,
            source=source,
            what=what,
            skip=skip,
            problems=problems,
            first_row=first["row"],
        )
        if len(tokenized) == 0:
            raise UserError(f"{what}: '{source}' has no usable rows left.")
    return tokenized.remove_columns(["problem", "problem_field"])


def truncation_report(tokenized: datasets.Dataset, name: str, spec: TokenizeSpec) -> str:
    sources = int(column(tokenized, "source_truncated").sum())
    targets = int(column(tokenized, "target_truncated").sum())
    if spec.format == "chat":
        lengths = column(tokenized, "num_source_tokens") + column(tokenized, "num_target_tokens")
        return (
            f"{name}: {len(tokenized)} conversations, {lengths.min()}-{lengths.max()} tokens; "
            f"{sources} longer than data.max_length={spec.max_length} kept their turns up to the "
            "last assistant reply that fits"
        )
    return (
        f"{name}: {len(tokenized)} examples; {sources} prompts truncated to "
        f"{spec.max_source_length} tokens, {targets} targets truncated to {spec.max_target_length}"
    )


@dataclass
class Collator:
    """Rows -> tensors: dynamic padding to the longest example in the micro-batch, or, with
    `packing`, all examples of the micro-batch in one row without padding.

    For seq2seq it also builds `decoder_input_ids` (labels shifted right behind the decoder
    start token), so the model never sees -100 and the loss is computed by the caller.

    Packed rows carry `position_ids` restarting at 0 for every example and no attention mask:
    transformers then keeps attention inside each example (the padding-free format of
    DataCollatorWithFlattening; masking_utils.find_packed_sequence_indices for sdpa/eager,
    varlen kernels for flash-attention). Each example's first label is -100, so no token is
    predicted from the previous example, as position 0 of a padded row never is.
    """

    pad_token_id: int
    decoder_start_token_id: int | None = None  # set for seq2seq models
    packing: bool = False  # causal models only (checked by the config)

    def _pad(self, rows: Sequence[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def _pack(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for example in examples:
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX, *example["labels"][1:]]
            positions += range(len(example["input_ids"]))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
        }

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self._pack(examples)
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
    """(real tokens, padded slots) over inputs and labels, for padding efficiency. A packed
    row has no padding: every slot is a real token."""
    if "attention_mask" not in batch:
        return batch["input_ids"].numel(), batch["input_ids"].numel()
    real, slots = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    if "decoder_input_ids" in batch:  # seq2seq: the decoder side pads too (causal: labels
        # share their positions with the inputs)
        real += int((batch["labels"] != IGNORE_INDEX).sum())
        slots += batch["labels"].numel()
    return real, slots
