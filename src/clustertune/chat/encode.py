"""A conversation as training tokens: one render, one tokenisation, labels on the replies.

With `{% generation %}` markers (template.py), transformers' renderer records the character
span of every marked block while it renders; the text is tokenised once with offsets and a
token is trained when it overlaps a span, the rule of `apply_chat_template(...,
return_assistant_tokens_mask=True)`, so the labels equal transformers' mask token for token.
Rendering through the renderer directly (not apply_chat_template) keeps the text, whose
offsets the reply boundaries need, at the cost of one render. Without markers, the spans come
from rendering prefixes (MASK_PREFIXES), then the same tokenisation and rule apply.

Replies are the unit of truncation and of `train_on=last_assistant`. Spans map onto assistant
messages one to one for most templates; where a template marks several blocks per reply (a
trailing EOS, reasoning and answer apart), the spans between two non-assistant messages form
one reply: those messages' texts, found in order outside every span, separate the replies.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from clustertune.chat.messages import Conversation, Problem
from clustertune.chat.template import (
    MASK_MARKERS,
    ChatTemplate,
    TemplateFault,
    template_fault,
)

IGNORE_INDEX = -100
REFUSED_BY_TEMPLATE = "is refused by the chat template"


def refused_by_template(fault: Exception) -> Problem:
    """A row the template itself raised on: the words `fault_of_refused` reads back."""
    return Problem(f"{REFUSED_BY_TEMPLATE} ({fault})")


def fault_of_refused(problem: str) -> str | None:
    """The template's own error in a `refused_by_template` problem (None: another problem);
    rows cross datasets.map as plain strings, so the words are the record."""
    if not problem.startswith(f"{REFUSED_BY_TEMPLATE} ("):
        return None
    return problem[len(REFUSED_BY_TEMPLATE) + 2 : -1]


Span = tuple[int, int]  # [start, end) characters of the rendered text


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    truncated: bool  # later turns dropped to fit max_length


def render(
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    generation_prompt: bool = False,
    with_spans: bool = False,
    **template_kwargs: Any,
) -> tuple[str, list[Span]]:
    """The text `template` renders for `messages` (and the spans of its generation blocks when
    `with_spans`), with the variables apply_chat_template gives a template (the special tokens).
    A template error is a TemplateFault."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, spans = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=template.text,
            return_assistant_tokens_mask=with_spans,
            add_generation_prompt=generation_prompt,
            **{**tokenizer.special_tokens_map, **template_kwargs},
        )
    except Exception as error:  # jinja2 errors, raise_exception() inside templates, TypeError
        raise template_fault(error) from None
    return texts[0], (spans[0] if with_spans else [])


def _prefix_spans(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation
) -> tuple[str, list[Span]]:
    """For a template without markers: the span of reply i lies between the render of the
    conversation before it (with the generation prompt) and the render up to it, trailing
    whitespace dropped. The template must render each prefix as the start of the whole."""
    messages, tools = conversation.messages, conversation.tools
    text, _ = render(tokenizer, template, messages, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto, _ = render(tokenizer, template, messages[: index + 1], tools=tools)
        if index:
            before, _ = render(
                tokenizer, template, messages[:index], tools=tools, generation_prompt=True
            )
        else:  # a reply opening the conversation: what precedes its content
            content = message["content"]
            before = upto[: upto.find(content)] if content and content in upto else ""
        if not (upto.startswith(before) and text.startswith(upto)):
            raise NotPrefixPreserving(index + 1)
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


class NotPrefixPreserving(Exception):
    def __init__(self, turn: int) -> None:
        super().__init__(turn)
        self.turn = turn


def _reply_groups(text: str, spans: list[Span], messages: list[dict[str, Any]]) -> list[list[Span]]:
    """The spans of each reply, in order (module docstring)."""
    if len(spans) == sum(m["role"] == "assistant" for m in messages):
        return [[span] for span in spans]
    starts = [start for start, _ in spans]
    anchors, cursor = [], 0
    for message in messages:
        needle = message["content"].strip() if message["role"] != "assistant" else ""
        while needle:
            found = text.find(needle, cursor)
            if found < 0:
                break
            inside = bisect_left(starts, found + 1) - 1  # the last span starting at or before
            if inside >= 0 and found < spans[inside][1]:
                cursor = spans[inside][1]  # within a reply: look after it
                continue
            anchors.append(found)
            cursor = found + len(needle)
            break
    groups: list[list[Span]] = []
    for span in spans:
        previous_end = groups[-1][-1][1] if groups else -1
        if groups and not any(previous_end <= anchor < span[0] for anchor in anchors):
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _token_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """Tokens overlapping a span: apply_chat_template's assistant-mask rule (spans in order)."""
    mask, index = [False] * len(offsets), 0
    for token, (start, end) in enumerate(offsets):
        while index < len(spans) and start >= spans[index][1]:
            index += 1
        if index == len(spans):
            break
        if end > spans[index][0]:
            mask[token] = True
    return mask


def spans_of(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation
) -> tuple[str, list[Span]]:
    """The rendered conversation and the spans of its replies, by the template's mask method."""
    if template.mask == MASK_MARKERS:
        return render(
            tokenizer, template, conversation.messages, tools=conversation.tools, with_spans=True
        )
    return _prefix_spans(tokenizer, template, conversation)


def encode_conversation(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    *,
    train_on: str,
    max_length: int,
) -> Rendered | Problem:
    """input_ids and labels of one conversation, or why it cannot be used.

    train_on: assistant (every reply), last_assistant (the final reply), all (every token).
    Longer than max_length: the turns after the last reply that fits are dropped (never a cut
    inside a turn); no reply to train fits: a problem."""
    try:
        text, spans = spans_of(tokenizer, template, conversation)
    except TemplateFault as fault:
        return refused_by_template(fault)
    except NotPrefixPreserving as error:
        return Problem(
            "cannot be rendered as the continuation of its shorter prefixes (turn "
            f"{error.turn}), so its replies cannot be located"
        )
    groups = _reply_groups(text, spans, conversation.messages)
    if not groups:
        return Problem("renders no assistant reply with this chat template")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    trained_groups = groups[-1:] if train_on == "last_assistant" else groups
    trained = _token_mask(offsets, [span for group in trained_groups for span in group])
    if train_on == "all":
        trained = [True] * len(ids)
    length, truncated = len(ids), False
    if length > max_length:
        starts = [start for start, _ in offsets]
        # tokens up to the end of each reply that may close the example
        ends = [bisect_left(starts, group[-1][1]) for group in trained_groups]
        fitting = [end for end in ends if end <= max_length]
        if not fitting:
            which = "last" if train_on == "last_assistant" else "first"
            return Problem(
                f"is {length} tokens, longer than data.max_length={max_length} even up to the "
                f"end of its {which} assistant reply ({ends[0]} tokens)"
            )
        length, truncated = fitting[-1], True
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids[:length], trained[:length], strict=True)]
    return Rendered(list(ids[:length]), labels, truncated)


# ------------------------------------------------------------------ prompts (evaluation)


def prompt_text(
    tokenizer: Any, template: ChatTemplate, conversation: Conversation, **template_kwargs: Any
) -> str:
    """The conversation before its last reply, with the generation prompt: what the model is
    given to write that reply. A template fault is a TemplateFault."""
    messages = conversation.messages[: conversation.last_reply_index]
    text, _ = render(
        tokenizer,
        template,
        messages,
        tools=conversation.tools,
        generation_prompt=True,
        **template_kwargs,
    )
    return text
