"""Every chat template the installed TRL ships, on every kind of conversation (multi-turn,
system prompt, tool calls in one and two rounds, parallel calls, reasoning): the labels equal
transformers' own assistant mask (`return_assistant_tokens_mask`) from the template with
generation markers that training renders with, token for token; or, for families without a
marked version, they cover each reply's text and nothing else; or the row is refused with one
line where the template itself rejects it (unit tier: no process group)."""

from __future__ import annotations

import pytest

from clustertune import chat
from clustertune.chat.template import _trl_templates, known_family
from clustertune.errors import UserError
from clustertune.smoke.conversations import (
    CONVERSATION_KINDS,
    MULTIMODAL_TEMPLATES,
    transformers_mask,
)

ORIGINALS = sorted(name for name in _trl_templates() if not name.endswith("_training"))


@pytest.fixture(scope="module")
def base_tokenizer(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_causal"]))


def family_tokenizer(base, family: str):
    tokenizer = base.__class__.from_pretrained(base.name_or_path)
    tokenizer.chat_template = _trl_templates()[family]
    return tokenizer


def test_the_installed_trl_ships_the_current_families():
    for family in ("qwen3", "qwen3_5_think", "gptoss", "deepseekv3", "phi3", "llama3_1", "gemma3"):
        assert family in ORIGINALS
    assert known_family(_trl_templates()["qwen3"]) == "qwen3"


@pytest.mark.parametrize("family", ORIGINALS)
def test_every_family_trains_each_reply_as_transformers_masks_it(base_tokenizer, family):
    tokenizer = family_tokenizer(base_tokenizer, family)
    if family in MULTIMODAL_TEMPLATES:
        with pytest.raises(
            UserError, match=f"the chat template \\(the tokenizer's own \\({family}"
        ):
            chat.training_template(tokenizer)
        return
    template = chat.training_template(tokenizer)
    trained_kinds = 0
    for kind, row in CONVERSATION_KINDS.items():
        conversation = chat.parse_conversation(row["messages"], row.get("tools"))
        encoded = chat.encode_conversation(
            tokenizer, template, conversation, train_on="assistant", max_length=1 << 20
        )
        if isinstance(encoded, chat.Problem):
            # refused only where the template itself rejects the row (raise_exception), or
            # where a template without markers cannot render it as a continuation
            assert str(encoded).startswith(chat.REFUSED_BY_TEMPLATE) or (
                template.mask == chat.MASK_PREFIXES and "continuation" in encoded
            ), f"{family}/{kind}: {encoded}"
            if str(encoded).startswith(chat.REFUSED_BY_TEMPLATE):
                with pytest.raises(Exception):  # noqa: B017  (jinja's TemplateError and others)
                    tokenizer.apply_chat_template(
                        row["messages"], tools=row.get("tools"), chat_template=template.text
                    )
            continue
        trained_kinds += 1
        labels = [int(label != chat.IGNORE_INDEX) for label in encoded.labels]
        if template.mask == chat.MASK_MARKERS:
            input_ids, mask = transformers_mask(tokenizer, template.text, row)
            assert encoded.input_ids == input_ids, f"{family}/{kind}"
            assert labels == mask, f"{family}/{kind}"
        else:
            check_replies_are_trained(tokenizer, encoded, row["messages"], f"{family}/{kind}")
    assert trained_kinds >= 3, f"{family}: only {trained_kinds} kinds trained"


def check_replies_are_trained(tokenizer, encoded, messages, where):
    """Without markers: every reply's content (and tool-call name) is inside the trained
    text, and no user, system or tool text is."""
    trained = [
        i if t != chat.IGNORE_INDEX else None
        for i, t in zip(encoded.input_ids, encoded.labels, strict=True)
    ]
    runs, current = [], []
    for token in [*trained, None]:
        if token is None and current:
            runs.append(tokenizer.decode(current).replace(" ", ""))
            current = []
        elif token is not None:
            current.append(token)
    text = "\n".join(runs)
    for message in messages:
        content = (message.get("content") or "").replace(" ", "")
        if message["role"] == "assistant":
            assert not content or content.split("</think>")[-1].strip() in text, where
            for call in message.get("tool_calls", []):
                assert call["function"]["name"] in text, where
        elif content:
            assert content not in text, where


def test_qwen3_is_trained_through_trls_marked_copy_with_each_reply_reasoning(base_tokenizer):
    """Qwen3's own template drops the reasoning of earlier replies; its training copy keeps
    each reply's own, so both replies are trained with their reasoning, in one example."""
    tokenizer = family_tokenizer(base_tokenizer, "qwen3")
    template = chat.training_template(tokenizer)
    assert template.mask == chat.MASK_MARKERS and "qwen3_training" in template.origin
    row = CONVERSATION_KINDS["reasoning"]
    encoded = chat.encode_conversation(
        tokenizer,
        template,
        chat.parse_conversation(row["messages"]),
        train_on="assistant",
        max_length=4096,
    )
    trained = tokenizer.decode([i for i in encoded.labels if i != chat.IGNORE_INDEX])
    for reasoning in ("Two plus two makes four.", "Three plus three makes six."):
        assert reasoning.replace(" ", "") in trained.replace(" ", "")
    assert "What is 2+2" not in trained


def test_gpt_oss_renders_a_pinned_date(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "gptoss")
    template = chat.training_template(tokenizer, date="2026-01-31")
    assert template.date == "2026-01-31" and template.identity()["chat.date"] == "2026-01-31"
    text, _ = chat.render(tokenizer, template, CONVERSATION_KINDS["multi-turn"]["messages"])
    assert "Current date: 2026-01-31" in text
    other_day = chat.training_template(tokenizer, date="2026-02-01")
    assert other_day.identity()["chat.date"] != template.identity()["chat.date"]
    assert not chat.training_template(family_tokenizer(base_tokenizer, "qwen3")).date


def test_stop_tokens_are_each_familys_end_of_turn(base_tokenizer):
    """The token a reply ends with, as a special token of the family's vocabulary: gpt-oss
    ends an answer with <|return|> and a tool call with <|call|>."""
    from tokenizers import AddedToken

    cases = {
        "qwen3": ["<|im_end|>"],
        "llama3": ["<|eot_id|>"],
        "gemma3": ["<end_of_turn>"],
        "gptoss": ["<|return|>", "<|call|>"],
    }
    for family, ends in cases.items():
        tokenizer = family_tokenizer(base_tokenizer, family)
        markers = ["<|return|>", "<|call|>", "<|end|>", "<|eot_id|>", "<end_of_turn>"]
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(m, special=True) for m in markers]}
        )
        template = chat.training_template(tokenizer)
        found = tokenizer.convert_ids_to_tokens(chat.end_of_turn_ids(tokenizer, template))
        assert found[: len(ends)] == ends, family
