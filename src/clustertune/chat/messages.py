"""Conversation rows as transformers' chat-template schema defines them, checked and made
uniform before any template sees them.

A row is a list of messages and, optionally, the tools it may call:
- roles `system`, `user`, `assistant`, `tool`;
- `content`: a string, or a list of text parts (`{"type": "text", "text": ...}`, joined);
  an assistant turn that only calls tools may have empty or null content;
- assistant `tool_calls`: `{"type": "function", "function": {"name", "arguments"}}` (the flat
  `{"name", "arguments"}` is nested so), arguments a dict or a JSON string of one (parsed:
  templates write them with `tojson`), plus any `id`;
- `tool` messages answer a preceding tool call (`name`, `tool_call_id` kept as written);
- reasoning as `reasoning_content` (or `<think>` inside the content, left to the template);
- `tools`: a list of JSON-schema function definitions, or a JSON string of one.
Every other key of a message is passed to the template as written: nothing is dropped.

Rows from datasets' Arrow storage carry the union of every row's keys, nested ones included,
filled with None; templates test keys (`'tool_calls' in message`, `tools | tojson`), so those
None values would change the render. Such rows have their None values removed recursively;
rows read from JSON files keep exactly what was written (data_files reads those columns as
JSON text, so no union is ever formed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_SHAPE = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
TOOL_SHAPE = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'


@dataclass(frozen=True)
class Conversation:
    """A checked conversation: messages in the schema above, and the tools it may call."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    @property
    def last_reply_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")


class Problem(str):
    """Why a row cannot be used (a data fault: refused naming its row, or skipped). `field`
    says which of the row's values it is about: "messages" or "tools"."""

    field: str = "messages"

    def about(self, field: str) -> Problem:
        problem = Problem(self)
        problem.field = field
        return problem


def without_nulls(value: Any) -> Any:
    """`value` with every None-valued dict entry removed, at any depth (Arrow's filled-in keys)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def decode_cell(value: Any) -> tuple[Any, bool]:
    """A messages/tools cell as Python values, and whether it came as JSON text (exactly as
    written) rather than from an Arrow struct (nulls filled in)."""
    if isinstance(value, str):
        try:
            return json.loads(value), True
        except json.JSONDecodeError:
            return value, True
    return value, False


def _text_of(content: Any) -> str | None:
    """A content value as one string: a string, or the text parts of a list joined (as the
    templates that take lists join them); None when it is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                if not isinstance(part.get("text"), str):
                    return None
                texts.append(part["text"])
            else:
                return None
        return "".join(texts)
    return None


def _tool_call(call: Any, number: int, index: int) -> dict[str, Any] | Problem:
    where = f"message {number} (assistant): tool call {index}"
    if not isinstance(call, dict):
        return Problem(f"{where} is not an object {TOOL_CALL_SHAPE}")
    function = call.get("function", call)
    if not isinstance(function, dict):
        return Problem(f"{where} has a 'function' that is not an object {TOOL_CALL_SHAPE}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        return Problem(f"{where} has no function name (write it as {TOOL_CALL_SHAPE})")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return Problem(
                f"{where} ({name}) has arguments that are not valid JSON ({error.msg} at "
                f"character {error.pos}); give a JSON object or a dict"
            )
    if not isinstance(arguments, dict):
        return Problem(
            f"{where} ({name}) has arguments that are neither a dict nor a JSON object "
            f"({type(arguments).__name__})"
        )
    extra = {k: v for k, v in call.items() if k not in ("function", "name", "arguments", "type")}
    nested = (
        {k: v for k, v in function.items() if k not in ("name", "arguments")}
        if "function" in call
        else {}  # flat: every other key belongs to the call (its id)
    )
    return {
        **extra,
        "type": "function",
        "function": {**nested, "name": name, "arguments": arguments},
    }


def _message(message: Any, number: int) -> dict[str, Any] | Problem:
    if not isinstance(message, dict):
        return Problem(f"message {number} is not a {{role, content}} object")
    role = message.get("role")
    if role is None:
        return Problem(f"message {number} has no 'role'")
    if role not in ROLES:
        return Problem(f"message {number} has the unknown role {role!r} (use {', '.join(ROLES)})")
    # None values are dropped, as apply_chat_template drops them (templates test for keys)
    out = {key: value for key, value in message.items() if value is not None}
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        return Problem(
            f"message {number} ({role}) has 'tool_calls'; only assistant turns call tools"
        )
    if calls is not None:
        if not isinstance(calls, list):
            return Problem(f"message {number} (assistant): 'tool_calls' is not a list")
        normalised = []
        for index, call in enumerate(calls, start=1):
            checked = _tool_call(call, number, index)
            if isinstance(checked, Problem):
                return checked
            normalised.append(checked)
        out["tool_calls"] = normalised
        if not normalised:
            del out["tool_calls"]
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        return Problem(f"message {number} ({role}): 'reasoning_content' is not text")
    content = message.get("content")
    if content is None and role == "assistant" and out.get("tool_calls"):
        content = ""  # a turn that only calls tools
    text = _text_of(content)
    if text is None:
        if isinstance(content, list):
            return Problem(
                f"message {number} ({role}) has a content part that is not text; a text model "
                'takes a string or [{"type": "text", "text": ...}] parts'
            )
        return Problem(f"message {number} ({role}) has no text 'content'")
    out["content"] = text
    if role == "assistant" and not (text.strip() or out.get("tool_calls") or reasoning):
        return Problem(f"message {number} is an empty assistant reply")
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None | Problem:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as error:
            return Problem(f"is not valid JSON ({error.msg} at character {error.pos})")
        if value is None:
            return None
    if not isinstance(value, list):
        return Problem(f"is {type(value).__name__}, not a list of function schemas {TOOL_SHAPE}")
    tools = []
    for index, tool in enumerate(value, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            return Problem(f"item {index} is not a function schema with a name ({TOOL_SHAPE})")
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    return tools or None


def parse_conversation(messages_cell: Any, tools_cell: Any = None) -> Conversation | Problem:
    """A row's conversation checked and made uniform (module docstring), or why it cannot be
    used: named by message number, so the user finds it in the row."""
    messages, exact = decode_cell(messages_cell)
    if not exact:
        messages = without_nulls(messages)
    if not isinstance(messages, list):
        kind = "null or missing" if messages is None else f"{type(messages).__name__}, not a list"
        return Problem(f"is {kind} (a conversation is a list of {{role, content}} messages)")
    if not messages:
        return Problem("holds no messages")
    checked: list[dict[str, Any]] = []
    calls_open = False  # the last assistant turn called tools, and no user turn came since
    for number, message in enumerate(messages, start=1):
        out = _message(message, number)
        if isinstance(out, Problem):
            return out
        if out["role"] == "tool" and not calls_open:
            return Problem(
                f"message {number} (tool) answers no tool call: no assistant turn with "
                "'tool_calls' precedes it"
            )
        if out["role"] in ("assistant", "user", "system"):
            calls_open = bool(out.get("tool_calls"))
        checked.append(out)
    if not any(m["role"] == "assistant" for m in checked):
        return Problem("has no assistant turn to train on or to score")
    tools_value, exact = decode_cell(tools_cell)
    tools = _tools(tools_value if exact else without_nulls(tools_value))
    if isinstance(tools, Problem):
        return tools.about("tools")
    return Conversation(checked, tools)
