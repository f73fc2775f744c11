"""The template a run renders with, chosen and checked before any row is read (the order
of preference is template.py's), and what generation stops at under it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from clustertune.chat.encode import NotPrefixPreserving, render, spans_of
from clustertune.chat.messages import Conversation
from clustertune.chat.template import (
    BUILTIN_TEMPLATES,
    GENERATION_MARKER,
    MASK_MARKERS,
    MASK_PREFIXES,
    PROBE_REPLY,
    PROBE_USER,
    ChatTemplate,
    TemplateFault,
    compile_template,
    known_family,
    pin_date,
    renders_date,
    template_text,
    training_copy,
)
from clustertune.errors import UserError


def _origin(setting: str, family: str | None) -> tuple[str, str | None]:
    if setting in BUILTIN_TEMPLATES:
        return f"built-in {setting}", None
    if setting:
        return f"data.chat_template file {setting}", setting
    return ("the tokenizer's own" + (f" ({family})" if family else "")), None


def training_template(tokenizer: Any, setting: str = "", date: str = "") -> ChatTemplate:
    """The template a run renders with and its mask method (module docstring), after the
    tokenizer got `setting` (resolve_chat_template). Template faults are one UserError naming
    the template, checked on a probe conversation before any row is read."""
    text = template_text(tokenizer)
    family = known_family(text)
    origin, path = _origin(setting, family)
    where = f"the chat template ({origin})"
    try:
        compile_template(text)
    except TemplateFault as fault:
        raise UserError(f"{where} does not compile: {fault}; fix the template.") from None
    mask = MASK_MARKERS
    if not GENERATION_MARKER.search(text):
        copy = training_copy(tokenizer)
        if copy is not None:
            family, text = copy
            origin = f"{origin}, trained through TRL's training copy {family}_training"
        else:
            mask = MASK_PREFIXES
    if renders_date(text):
        date = date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
        text = pin_date(text, date)
    else:
        date = ""
    template = ChatTemplate(text, origin, mask, path, date or None)
    probe_template(tokenizer, template)
    return template


# ------------------------------------------------------------------ template probes


def _probe(tool_call: bool = False) -> Conversation:
    reply: dict[str, Any] = {"role": "assistant", "content": PROBE_REPLY}
    if tool_call:
        reply = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": PROBE_REPLY, "arguments": {"a": 1}}}
            ],
        }
    return Conversation([{"role": "user", "content": PROBE_USER}, reply])


def probe_template(tokenizer: Any, template: ChatTemplate) -> None:
    """Refuse a template that cannot train anything, before any row is read: one that raises
    on a plain [user, assistant] conversation, never writes the reply, or whose markers leave
    the reply out. The error names the template and the Jinja error's line."""
    where = f"the chat template ({template.origin})"
    fix = "fix the template" + (f" file {template.path}" if template.path else "")
    probe = _probe()
    try:
        text, spans = spans_of(tokenizer, template, probe)
    except TemplateFault as fault:
        raise UserError(
            f"{where} fails on a plain user/assistant conversation: {fault}; {fix}."
        ) from None
    except NotPrefixPreserving:
        raise UserError(
            f"{where} marks no {{% generation %}} spans, is not a family whose training copy "
            "the installed TRL ships, and does not render a conversation as the continuation of "
            "its shorter prefixes, so the trained tokens cannot be located; give a template file "
            "whose replies are wrapped in {% generation %}...{% endgeneration %} "
            "(data.chat_template=<file.jinja>)."
        ) from None
    if PROBE_REPLY not in text:
        raise UserError(
            f"{where} never writes an assistant reply's content (a probe reply is missing from "
            f"its render), so nothing of a reply could be trained; {fix}."
        )
    if not any(start <= text.find(PROBE_REPLY) < end for start, end in spans):
        raise UserError(
            f"{where} leaves the reply's content outside its {{% generation %}} markers, so the "
            f"loss would miss it; {fix}."
        )


def end_of_turn_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end a reply under the template (e.g. <|im_end|>; gpt-oss: <|return|>
    after an answer, <|call|> after a tool call), for generation to stop at: the first special
    token written after a probe reply's content and after a probe tool call, then EOS."""
    special = set(tokenizer.all_special_ids) | {
        token_id
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if token.special
    }
    found: list[int] = []
    for tool_call in (False, True):
        try:
            text, _ = render(tokenizer, template, _probe(tool_call).messages)
        except TemplateFault:
            continue
        anchor = text.rfind(PROBE_REPLY)
        if anchor < 0:
            continue
        tail = text[anchor + len(PROBE_REPLY) :]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        # only a special token: an ordinary one (the "<" of a marker written as text), or an
        # added one that is not special (Qwen's </tool_call>), would stop inside a reply
        first = next((i for i in ids if i in special), None)
        if first is not None and first not in found:
            found.append(first)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found
