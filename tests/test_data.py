"""Data pipeline units: loading errors, tokenisation, collation with -100."""

from __future__ import annotations

import json

import pytest

from clustertune.data import Collator, TokenizeSpec, batch_token_stats, load_split, tokenize_dataset
from clustertune.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_collator_pads_labels_with_ignore_index_and_shifts_decoder_inputs():
    collate = Collator(pad_token_id=0, decoder_start_token_id=0)
    batch = collate(
        [{"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]}, {"input_ids": [5, 1], "labels": [4, 1]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, 1], [4, 1, -100]]  # never the pad id
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 9], [0, 4, 1]]
    real, slots = batch_token_stats(batch)
    assert (real, slots) == (4 + 2 + 3 + 2, 8 + 6)


def test_causal_collation_has_no_decoder_inputs():
    batch = Collator(pad_token_id=3)(
        [{"input_ids": [1, 2, 9], "labels": [-100, -100, 9]}, {"input_ids": [1], "labels": [-100]}]
    )
    assert "decoder_input_ids" not in batch
    assert batch["labels"].tolist() == [[-100, -100, 9], [-100, -100, -100]]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summary": \n')
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON line"):
        load_split(
            str(path),
            split="train",
            required_columns=["dialogue", "summary"],
            what="data.train_file",
        )


def test_missing_column_lists_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "a", "abstract": "b"}])
    with pytest.raises(UserError, match=r"no column 'summary' \(columns: dialogue, abstract\)"):
        load_split(
            str(path),
            split="train",
            required_columns=["dialogue", "summary"],
            what="data.train_file",
        )


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_split(
            str(tmp_path / "nope.jsonl"), split="train", required_columns=[], what="data.train_file"
        )
    empty = tmp_path / "empty.csv"
    empty.write_text("dialogue,summary\n")
    with pytest.raises(UserError, match="has no examples"):
        load_split(
            str(empty),
            split="train",
            required_columns=["dialogue", "summary"],
            what="data.eval_file",
        )


@pytest.fixture(scope="module")
def tokenizer(smoke_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smoke_assets["tiny_t5"])


def test_seq2seq_tokenisation_truncates_and_counts(tmp_path, tokenizer):
    rows = [
        {"dialogue": "hello there " * 50, "summary": "ok"},
        {"dialogue": "hi", "summary": "ok " * 40},
    ]
    dataset = load_split(
        str(write_jsonl(tmp_path / "d.jsonl", rows)),
        split="train",
        required_columns=["dialogue", "summary"],
        what="data.train_file",
    )
    spec = TokenizeSpec("seq2seq", "Summarize: {dialogue}", "summary", 16, 8)
    out = tokenize_dataset(dataset, tokenizer, spec)
    assert list(out["source_truncated"]) == [True, False] and list(out["target_truncated"]) == [
        False,
        True,
    ]
    assert len(out[0]["input_ids"]) == 16 and out[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert out[1]["num_target_tokens"] == 8 and out[1]["labels"][-1] == tokenizer.eos_token_id


def test_causal_tokenisation_masks_the_prompt(tmp_path, tokenizer):
    dataset = load_split(
        str(write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "a b c", "summary": "d e"}])),
        split="train",
        required_columns=["dialogue", "summary"],
        what="data.train_file",
    )
    out = tokenize_dataset(
        dataset, tokenizer, TokenizeSpec("causal", "{dialogue} =>", "summary", 64, 64)
    )[0]
    prompt = out["num_source_tokens"]
    assert out["labels"][:prompt] == [-100] * prompt
    assert out["labels"][prompt:] == out["input_ids"][prompt:]
    assert (
        out["labels"][-1] == tokenizer.eos_token_id
        and out["num_target_tokens"] == len(out["labels"]) - prompt
    )
