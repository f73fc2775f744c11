"""Conversations as training examples and evaluation prompts, for every chat-template family:
the message schema (messages.py), which template renders and how its trained tokens are found
(template.py, resolve.py), one render per conversation to tokens and labels (encode.py),
and generated replies read back into their parts (replies.py)."""

from clustertune.chat.encode import (
    IGNORE_INDEX,
    REFUSED_BY_TEMPLATE,
    Rendered,
    encode_conversation,
    fault_of_refused,
    prompt_text,
    refused_by_template,
    render,
)
from clustertune.chat.messages import ROLES, Conversation, Problem, parse_conversation
from clustertune.chat.resolve import end_of_turn_ids, training_template
from clustertune.chat.template import (
    BUILTIN_TEMPLATES,
    CHATML,
    MASK_MARKERS,
    MASK_PREFIXES,
    ChatTemplate,
    TemplateFault,
    check_template_available,
    has_chat_template,
    resolve_chat_template,
    uses_chat_template,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "CHATML",
    "IGNORE_INDEX",
    "MASK_MARKERS",
    "MASK_PREFIXES",
    "REFUSED_BY_TEMPLATE",
    "ROLES",
    "ChatTemplate",
    "Conversation",
    "Problem",
    "Rendered",
    "TemplateFault",
    "check_template_available",
    "encode_conversation",
    "fault_of_refused",
    "end_of_turn_ids",
    "has_chat_template",
    "parse_conversation",
    "prompt_text",
    "refused_by_template",
    "render",
    "resolve_chat_template",
    "training_template",
    "uses_chat_template",
]
