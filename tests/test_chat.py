"""Chat rendering and assistant-only labels, bad conversations, packing and token budgets
(unit tier: no process group)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import BAD_CONVERSATIONS

from clustertune import chat
from clustertune.config import DataConfig
from clustertune.data import IGNORE_INDEX, Collator, batch_token_stats
from clustertune.errors import UserError
from clustertune.sampler import GlobalBatchPlan
from clustertune.training_data import load_rows, tokenize_rows, tokenize_spec

SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "Where is the station?"},
    {"role": "assistant", "content": "Two streets north."},
    {"role": "user", "content": "And the bank?"},
    {"role": "assistant", "content": "Next to it."},
]


@pytest.fixture()
def tokenizer(smoke_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smoke_assets["tiny_causal"])


def encode(tokenizer, messages, *, train_on="assistant", max_length=1024, tools=None):
    """The training encoding of one conversation with the tokenizer's template."""
    template = chat.training_template(tokenizer)
    conversation = chat.parse_conversation(messages, tools)
    return chat.encode_conversation(
        tokenizer, template, conversation, train_on=train_on, max_length=max_length
    )


def chatml_text(messages):
    """ChatML written by hand, independently of the template engine."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def trained_runs(labels):
    """Contiguous runs of trained positions, as (start, end) pairs."""
    runs, start = [], None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_labels_cover_exactly_the_assistant_replies_token_by_token(tokenizer, train_on):
    assert chat.has_chat_template(tokenizer)
    rendered = encode(tokenizer, TURNS, train_on=train_on)
    ids = tokenizer(chatml_text(TURNS), add_special_tokens=False)["input_ids"]
    assert rendered.input_ids == ids
    assert not rendered.truncated
    if train_on == "all":
        assert rendered.labels == ids
        return
    replies = [m["content"] for m in TURNS if m["role"] == "assistant"]
    runs = trained_runs(rendered.labels)
    assert len(runs) == len(replies)
    for (start, end), reply in zip(runs, replies, strict=True):
        assert rendered.labels[start:end] == ids[start:end]
        # the run is the reply and its end-of-turn token, token for token ...
        assert tokenizer.decode(ids[start:end]).replace(" ", "") == (reply + "<|im_end|>").replace(
            " ", ""
        )
        assert ids[end - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        # ... right after the role header, which is not trained
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_builtin_chatml_on_a_tokenizer_without_a_template(tokenizer):
    tokenizer.chat_template = None
    assert not chat.has_chat_template(tokenizer)
    assert chat.resolve_chat_template(tokenizer, "chatml") == []  # its markers exist already
    rendered = encode(tokenizer, TURNS)
    assert (
        rendered.input_ids == tokenizer(chatml_text(TURNS), add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(UserError, match="neither a built-in template"):
        chat.resolve_chat_template(tokenizer, "chatlm")


def test_a_custom_template_without_generation_markers(tokenizer, tmp_path):
    """A template of another shape (Llama-2-like, whitespace stripped): the mask still holds
    the reply and its end-of-turn marker and nothing else."""
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() "
        "+ ' </s>' }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '' }}{% endif %}"
    )
    chat.resolve_chat_template(tokenizer, str(template))
    rendered = encode(tokenizer, TURNS[1:])
    trained = tokenizer.decode([i for i in rendered.labels if i != IGNORE_INDEX])
    assert "Two streets north." in trained and "Next to it." in trained
    assert "[INST]" not in trained and "station" not in trained
    template = chat.training_template(tokenizer, str(template))
    assert template.mask == chat.MASK_PREFIXES
    assert chat.end_of_turn_ids(tokenizer, template)[0] == tokenizer.convert_tokens_to_ids("</s>")


def test_a_long_conversation_keeps_whole_turns(tokenizer):
    full = encode(tokenizer, TURNS)
    first_reply = encode(tokenizer, TURNS[:3])
    cut = encode(tokenizer, TURNS, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.input_ids == first_reply.input_ids[: len(cut.input_ids)]
    assert tokenizer.decode(cut.input_ids).endswith("<|im_end|>")  # never inside a header
    problem = encode(tokenizer, TURNS, max_length=10)
    assert isinstance(problem, str) and "longer than data.max_length=10" in problem


def test_end_of_turn_and_prompt(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    template = chat.training_template(tokenizer)
    assert chat.end_of_turn_ids(tokenizer, template)[0] == im_end
    prompt = chat.prompt_text(tokenizer, template, chat.parse_conversation(TURNS))
    assert prompt.endswith("<|im_start|>assistant\n") and "Next to it" not in prompt


BAD_ROWS = BAD_CONVERSATIONS


def write_chat(path, rows):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def load_chat(path, tokenizer, **data):
    cfg = DataConfig(format="chat", train_file=str(path), **data)
    spec = tokenize_spec(cfg, "causal", tokenizer, "tiny")
    rows = load_rows(cfg, str(path), "train", "data.train_file")
    return tokenize_rows(rows, tokenizer, spec, cfg, str(path), "data.train_file")


@pytest.mark.parametrize(("name", "messages", "message"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_each_bad_conversation_is_named_or_skipped(name, messages, message, tokenizer, tmp_path):
    good = TURNS[1:3]
    path = write_chat(tmp_path / "chat.jsonl", [good, good, messages, good])
    with pytest.raises(UserError) as error:
        load_chat(path, tokenizer)
    assert message in str(error.value)
    assert "line 3" in str(error.value)
    kept = load_chat(path, tokenizer, skip_invalid_rows=True)
    assert len(kept) == 3 and "problem" not in kept.column_names


def test_too_long_conversations_are_refused_or_skipped(tokenizer, tmp_path):
    path = write_chat(tmp_path / "chat.jsonl", [TURNS[1:3], TURNS])
    with pytest.raises(UserError, match="line 1.*longer than data.max_length=12"):
        load_chat(path, tokenizer, max_length=12)
    first_reply = encode(tokenizer, TURNS[:3], train_on="all", max_length=99)
    fits = len(first_reply.input_ids)  # TURNS is cut after its first reply, not skipped
    assert len(load_chat(path, tokenizer, max_length=fits, skip_invalid_rows=True)) == 2
    assert len(load_chat(path, tokenizer, max_length=fits - 2, skip_invalid_rows=True)) == 1


def test_text_rows_through_the_chat_template(tokenizer, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"dialogue": "A: hi\nB: hello", "summary": "They greet."}) + "\n")
    cfg = DataConfig(train_file=str(path), prompt_template="Summarize: {dialogue}")
    spec = tokenize_spec(cfg, "causal", tokenizer, "tiny")
    assert spec.use_chat_template  # null: the tokenizer has a template
    row = tokenize_rows(
        load_rows(cfg, str(path), "train", "x"), tokenizer, spec, cfg, str(path), "x"
    )[0]
    messages = [
        {"role": "user", "content": "Summarize: A: hi\nB: hello"},
        {"role": "assistant", "content": "They greet."},
    ]
    ids = tokenizer(chatml_text(messages), add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == ids
    ((start, end),) = trained_runs(row["labels"])
    assert tokenizer.decode(ids[start:end]).replace(" ", "") == "Theygreet.<|im_end|>"
    assert row["num_target_tokens"] == end - start
    raw = tokenize_spec(
        DataConfig(train_file="x", use_chat_template=False), "causal", tokenizer, "t"
    )
    assert not raw.use_chat_template


def test_seq2seq_refuses_chat_and_packing():
    from clustertune.training_data import check_data_for_model

    for data in (dict(format="chat"), dict(packing=True), dict(use_chat_template=True)):
        with pytest.raises(UserError, match="a decoder-only model, and this one is seq2seq"):
            check_data_for_model(DataConfig(**data), "seq2seq")
    check_data_for_model(DataConfig(packing=True, format="chat"), "causal")


def test_packed_batch_restarts_positions_and_masks_each_first_label():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},  # train_on all: its first label is set
    ]
    batch = Collator(pad_token_id=0, packing=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 is never predicted from 7
    assert "attention_mask" not in batch
    assert batch_token_stats(batch) == (5, 5)  # no padding slots: efficiency 1.0


def test_packing_check_refuses_a_model_whose_attention_crosses_examples(smoke_assets):
    from transformers import AutoModelForCausalLM

    from clustertune.packing import TOLERANCE, packed_logit_change

    model = AutoModelForCausalLM.from_pretrained(smoke_assets["tiny_causal"])
    assert packed_logit_change(model, model.config.vocab_size, "cpu") < 1e-6

    class IgnoresPositions(torch.nn.Module):  # one causal row: attention crosses examples
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, use_cache):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    change = packed_logit_change(IgnoresPositions(model), model.config.vocab_size, "cpu")
    assert change > 100 * TOLERANCE
    from types import SimpleNamespace

    from clustertune.packing import check_packing_isolates

    on_cpu = SimpleNamespace(unwrap_model=lambda m: m, device="cpu")  # what the check reads
    assert "stays inside" in check_packing_isolates(model, model.config.vocab_size, on_cpu)
    with pytest.raises(UserError, match="attention crosses the boundaries of packed examples"):
        check_packing_isolates(IgnoresPositions(model), model.config.vocab_size, on_cpu)


def plan(world_size, rank=0, budget=400, packing=False, global_batch=16, seed=0):
    rng = np.random.default_rng(seed)
    sources = rng.integers(10, 150, 200)
    targets = rng.integers(5, 60, 200)
    return GlobalBatchPlan(
        source_lengths=sources,
        target_lengths=targets,
        global_batch_size=global_batch,
        micro_batch_size=1,
        world_size=world_size,
        rank=rank,
        seed=0,
        micro_batch_tokens=budget,
        row_lengths=sources + targets,
        packing=packing,
    )


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_budget_keeps_the_global_batch_and_equal_micro_steps(world_size, packing):
    reference = plan(1, packing=packing)
    for step, global_batch in enumerate(reference.global_batches(0)[:20]):
        per_rank = [
            plan(world_size, rank, packing=packing).rank_micro_batches(global_batch)
            for rank in range(world_size)
        ]
        assert len({len(mine) for mine in per_rank}) == 1, f"step {step}: unequal micro-steps"
        real = [i for mine in per_rank for indices, pad in mine if not pad for i in indices]
        assert sorted(real) == sorted(global_batch.tolist())  # each example exactly once
        costs = reference.row_lengths
        for mine in per_rank:
            for indices, _ in mine:
                cost = costs[indices].sum() if packing else len(indices) * costs[indices].max()
                assert cost <= 400


def test_token_budget_pads_with_zero_weight_repeats_when_nothing_splits():
    tight = plan(2, budget=210, global_batch=3)  # examples of up to 210 tokens: one per bin
    bins = tight.token_bins(tight.global_batches(0)[0])
    assert len(bins) == 4 and [pad for _, pad in bins] == [False, False, False, True]


def test_token_budget_smaller_than_an_example_is_refused():
    with pytest.raises(UserError, match="train.micro_batch_tokens=100 is smaller than the longest"):
        plan(1, budget=100)
