"""Conversations of every kind the chat templates of current families are checked on: a
multi-turn chat, a system prompt, one and two rounds of tool calls, parallel calls, reasoning
as `reasoning_content` and inside the content. Used by the family tests and
benchmarks/chat_templates.py (the family x kind table)."""

from __future__ import annotations

from typing import Any

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


def weather_call(city: str, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": city}},
    }


def _result(content: str, call_id: str) -> dict[str, Any]:
    return {"role": "tool", "name": "get_weather", "tool_call_id": call_id, "content": content}


CONVERSATION_KINDS: dict[str, dict[str, Any]] = {
    "multi-turn": {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "Why did the chicken cross the road?"},
        ]
    },
    "system": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    },
    "tool call": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris", "c1")]},
            _result('{"sky": "sunny", "celsius": 20}', "c1"),
            {"role": "assistant", "content": "It is sunny and 20C in Paris."},
        ],
        "tools": [WEATHER_TOOL],
    },
    "two rounds": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris", "c1")]},
            _result('{"sky": "sunny"}', "c1"),
            {"role": "assistant", "content": "", "tool_calls": [weather_call("Lyon", "c2")]},
            _result('{"sky": "rain"}', "c2"),
            {"role": "assistant", "content": "Paris is sunny, Lyon rainy."},
        ],
        "tools": [WEATHER_TOOL],
    },
    "parallel calls": {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [weather_call("Paris", "c1"), weather_call("Rome", "c2")],
            },
            _result('{"sky": "sunny"}', "c1"),
            _result('{"sky": "cloudy"}', "c2"),
            {"role": "assistant", "content": "Paris is sunny, Rome cloudy."},
        ],
        "tools": [WEATHER_TOOL],
    },
    "reasoning": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {
                "role": "assistant",
                "reasoning_content": "Two plus two makes four.",
                "content": "It is 4.",
            },
            {"role": "user", "content": "And 3+3?"},
            {
                "role": "assistant",
                "reasoning_content": "Three plus three makes six.",
                "content": "It is 6.",
            },
        ]
    },
    "think in content": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {
                "role": "assistant",
                "content": "<think>\nTwo plus two makes four.\n</think>\n\nIt is 4.",
            },
        ]
    },
}


def transformers_mask(tokenizer: Any, template_text: str, row: dict[str, Any]) -> tuple[list, list]:
    """(input_ids, assistant mask) of a row as transformers computes them itself from a
    template with generation markers: the reference the masks of training are held to."""
    reference = tokenizer.apply_chat_template(
        row["messages"],
        tools=row.get("tools"),
        chat_template=template_text,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return reference["input_ids"], reference["assistant_masks"]


# Templates of multimodal processors: their content must be a list of image/text blocks, so a
# text tokenizer cannot render them (refused with the template named).
MULTIMODAL_TEMPLATES = ("idefics3", "llava_next", "smolvlm")
