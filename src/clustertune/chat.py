"""Conversations as training examples: the tokenizer's chat template renders them, and the
labels train the assistant turns only (their content and end-of-turn tokens).

The assistant mask, for any template. transformers can return an assistant mask itself
(`return_assistant_tokens_mask`), but only for templates that mark replies with
`{% generation %}`, which most published templates do not. So for reply i the template is
rendered twice, the conversation before it with the generation prompt and the conversation up
to and including it; the characters between the two renders are the reply as the template
writes it (content and end-of-turn, trailing whitespace dropped). The whole conversation is
tokenised once and a token is trained when its first character lies in a reply span. This
needs a template whose render of a conversation starts with the render of every shorter
prefix; a template that rewrites earlier turns (e.g. drops earlier reasoning) is refused with a
message, never trained with a wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

# ChatML (Qwen, SmolLM2, many others): the built-in for tokenizers without a template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def resolve_chat_template(
    tokenizer: Any, setting: str, key: str = "data.chat_template"
) -> list[str]:
    """Give the tokenizer the template `setting` names: a built-in, or a Jinja file (empty:
    keep its own). The built-in ChatML's markers become special tokens if the vocabulary
    lacks them, so that each is one token; returns those added (the model's embeddings must
    grow to match, and their rows be trained)."""
    if not setting:
        return []
    if setting in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[setting]
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in CHATML_TOKENS if token not in vocabulary]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        return missing
    path = Path(setting).expanduser()
    if not path.is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        raise UserError(
            f"{key}='{setting}' is neither a built-in template ({names}) nor a Jinja file; give "
            "the path of a .jinja file, a built-in name, or leave it empty for the tokenizer's own."
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return []


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_problem(messages: Any) -> str | None:
    """Why a row's conversation cannot be trained or evaluated on; None when it can."""
    if not isinstance(messages, list):
        kind = "null or missing" if messages is None else f"{type(messages).__name__}, not a list"
        return f"is {kind} (a conversation is a list of {{role, content}} messages)"
    if not messages:
        return "holds no messages"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {number} is not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return f"message {number} has no 'role'"
        if role not in ROLES:
            return f"message {number} has the unknown role {role!r} (use {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"message {number} ({role}) has no text 'content'"
        if role == "assistant" and not content.strip():
            return f"message {number} is an empty assistant reply"
    if not any(message["role"] == "assistant" for message in messages):
        return "has no assistant turn to train on or to score"
    return None


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Only role and content: datasets fills keys other rows have with None, and templates
    test keys (`'tool_calls' in message`) that would then be present."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as error:  # jinja2 TemplateError, or raise_exception() inside templates
        raise _TemplateFailure(str(error).splitlines()[0] if str(error) else repr(error)) from None


class _TemplateFailure(Exception):
    pass


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    truncated: bool  # later turns dropped to fit max_length


def reply_spans(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it."""
    text = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True) if index else None
        upto = render(tokenizer, messages[: index + 1], generation_prompt=False)
        if before is None:  # a reply opening the conversation: what precedes its content
            before = upto[: upto.find(message["content"])] if message["content"] in upto else ""
        if not (upto.startswith(before) and text.startswith(upto)):
            raise _TemplateFailure(
                "the chat template does not render a conversation as the continuation of its "
                f"shorter prefixes (turn {index + 1}), so the assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], *, train_on: str, max_length: int
) -> Rendered | str:
    """input_ids and labels of one conversation, or why it cannot be used (a problem text).

    Longer than max_length: the turns after the last assistant reply that fits are dropped
    (never a cut inside a turn or its role header); none fits: a problem."""
    try:
        text, spans = reply_spans(tokenizer, messages)
    except _TemplateFailure as failure:
        return f"cannot be rendered with the chat template ({failure})"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    starts = [start for start, _ in offsets]
    trained = [train_on == "all"] * len(ids)
    reply_end_tokens = []  # token index after each reply
    for span_start, span_end in spans:
        end = sum(1 for start in starts if start < span_end)
        reply_end_tokens.append(end)
        for token in range(end):
            if starts[token] >= span_start:
                trained[token] = True
    length = len(ids)
    truncated = False
    if length > max_length:
        fitting = [end for end in reply_end_tokens if end <= max_length]
        if not fitting:
            return (
                f"is {length} tokens, longer than data.max_length={max_length} even up to the end "
                f"of its first assistant reply ({reply_end_tokens[0]} tokens)"
            )
        length, truncated = fitting[-1], True
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids[:length], trained[:length], strict=True)]
    return Rendered(list(ids[:length]), labels, truncated)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant reply under the tokenizer's template (e.g. <|im_end|>),
    for generation to stop at: what the template writes after a reply's content."""
    probe = "clustertune-probe-reply"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        text = render(tokenizer, messages, generation_prompt=False)
    except _TemplateFailure:
        return []
    tail = text[text.rfind(probe) + len(probe) :].strip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    # only a special token: an ordinary one (e.g. the "<" of a marker written as text) would
    # stop generation wherever that text occurs
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    found = [ids[0]] if ids and ids[0] in special else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation before its last assistant reply, with the generation prompt: what the
    model is given to write that reply (evaluation)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:
        text = render(tokenizer, messages[:last], generation_prompt=True)
    except _TemplateFailure as failure:
        raise UserError(
            f"the chat template cannot render an evaluation prompt: {failure}"
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_template_available(
    tokenizer: Any, model_name: str, key: str = "data.chat_template"
) -> None:
    if not has_chat_template(tokenizer):
        raise UserError(
            f"data.format=chat: the tokenizer of '{model_name}' has no chat template; set "
            f"{key}=chatml (built in) or {key}=<file.jinja>."
        )


def uses_chat_template(
    tokenizer: Any, data_format: str, use_chat_template: bool | None, model_name: str
) -> bool:
    """Whether rows are rendered with the chat template, for training and evaluation alike:
    conversations always; text rows when data.use_chat_template says so (null: when the
    tokenizer has one). A template that is asked for and missing is refused."""
    if data_format == "chat" or use_chat_template:
        check_template_available(tokenizer, model_name)
    if data_format == "chat":
        return True
    return has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
