"""A generated reply read back into its parts (reasoning, tool calls, content), and tool calls
compared with the reference's: what evaluation scores when a conversation ends in a tool call.

The family's own parser is used where one exists: transformers' `parse_response` with the
tokenizer's `response_template` (shipped by newer checkpoints, or set for a known family by
TRL's `add_response_schema`). Without one, Hermes-style output, the format most open models
and tool-calling datasets use, is read: `<think>...</think>` reasoning and JSON objects inside
`<tool_call>...</tool_call>`. Output that does not parse is content, never an error: a model
that writes a malformed call has simply not called the tool.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

_THINK = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def install_parser(tokenizer: Any) -> str:
    """Give the tokenizer its family's response parser where TRL knows the family and it has
    none; returns which parser replies go through (for the report)."""
    if getattr(tokenizer, "response_template", None) is None:
        try:
            from trl.chat_template_utils import add_response_schema

            add_response_schema(tokenizer)
        except (ImportError, ValueError):  # no TRL, or a family it has no parser for
            pass
    if getattr(tokenizer, "response_template", None) is not None:
        return "the tokenizer's response template (transformers parse_response)"
    return "Hermes-style: <think>...</think> reasoning, JSON in <tool_call>...</tool_call>"


def _hermes(text: str) -> dict[str, Any]:
    reply: dict[str, Any] = {"role": "assistant"}
    think = _THINK.match(text) if "</think>" in text else None
    if think:
        reply["reasoning_content"] = think.group(1).strip()
        text = text[think.end() :]
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(
                {"type": "function", "function": {"name": call["name"], "arguments": arguments}}
            )
    if calls:
        reply["tool_calls"] = calls
    reply["content"] = _TOOL_CALL.sub("", text).strip()
    return reply


def parse_reply(
    tokenizer: Any, ids: list[int], prompt_ids: list[int], tools: list[dict] | None = None
) -> dict[str, Any]:
    """{content, reasoning_content?, tool_calls?} of one generated reply (up to its stop
    token), parsed as the module docstring says."""
    if getattr(tokenizer, "response_template", None) is not None:
        try:
            parsed = tokenizer.parse_response(ids, prefix=prompt_ids, tools=tools)
            if isinstance(parsed, dict):
                parsed.setdefault("content", "")
                parsed["content"] = (parsed.get("content") or "").strip()
                return parsed
        except Exception:  # a malformed reply: read it as text below
            pass
    return _hermes(tokenizer.decode(ids, skip_special_tokens=True))


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def call_signatures(calls: list[dict[str, Any]] | None) -> list[str]:
    """Each call as canonical JSON of its function name and parsed arguments (key order and a
    JSON-string encoding of the arguments do not matter)."""
    signatures = []
    for call in calls or []:
        function = call.get("function", call)
        signatures.append(
            json.dumps(
                {"name": function.get("name"), "arguments": _arguments(function.get("arguments"))},
                sort_keys=True,
                ensure_ascii=False,
            )
        )
    return signatures


def calls_text(calls: list[dict[str, Any]] | None) -> str:
    """The calls as one text, what ROUGE compares when the reference reply is a tool call."""
    return "\n".join(sorted(call_signatures(calls)))


def calls_match(predicted: list[dict] | None, reference: list[dict] | None) -> tuple[bool, bool]:
    """(exact, names): the same calls with the same arguments, in any order (parallel calls);
    the same function names."""
    predicted_sig, reference_sig = call_signatures(predicted), call_signatures(reference)
    names = Counter(json.loads(s)["name"] for s in predicted_sig) == Counter(
        json.loads(s)["name"] for s in reference_sig
    )
    return Counter(predicted_sig) == Counter(reference_sig), names
