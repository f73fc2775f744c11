"""Loading, validating and tokenising (source, target) text pairs, and collating batches.

Two model kinds share everything here except how an example becomes tensors:
- seq2seq (T5, BART): `input_ids` is the prompt; `labels` is the summary (+ EOS).
- causal (decoder-only): `input_ids` is prompt + summary + EOS; `labels` masks the prompt
  with -100 so only summary tokens are trained.
Labels are always padded with -100, never with the pad id (the seed tutorial trained on
padding that way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from clustertune.errors import UserError

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_jsonl(path: Path) -> None:
    """Fail on the first malformed line with its number (datasets' own error hides it)."""
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise UserError(
                    f"{path}:{line_number}: malformed JSON line ({error.__class__.__name__}: "
                    f"{str(error).splitlines()[0]}); fix or remove that line."
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object per line.")


def load_split(
    file_or_dataset: str, *, split: str, required_columns: Sequence[str], what: str
) -> datasets.Dataset:
    """Load a local jsonl/json/csv/parquet file or a hub dataset split, then validate it.

    `what` names the config key the input came from, so errors point at the right knob.
    """
    path = Path(file_or_dataset).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"{what}: file '{file_or_dataset}' does not exist; check the path.")
        if suffix not in LOCAL_FORMATS:
            raise UserError(
                f"{what}: '{file_or_dataset}' has an unsupported extension; use one of "
                f"{', '.join(sorted(LOCAL_FORMATS))}."
            )
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
