"""What encoding a conversation for training costs against one render + tokenisation of it.

    python benchmarks/chat_encode.py [--turns 1 4 16 64 256] [--repeats 5] [--json FILE]

For conversations of 1 to 256 turns (a turn: a user message and the assistant's reply; every
fourth reply calls a tool whose result follows, and every third carries reasoning), each way
of finding the trained tokens is timed against `tokenizer.apply_chat_template(messages,
tools=..., tokenize=True)` of the same conversation with the tokenizer's own template, the
work any chat SFT tool does at the least:

- `qwen3 via TRL's marked copy`: the tiny Qwen3-template Llama's tokenizer; rows rendered
  through TRL's generation-marked training copy, one render (template.MASK_MARKERS);
- `built-in chatml (markers)`: data.chat_template=chatml, one render;
- `prefix renders`: the tiny Llama's unmarked ChatML, each reply found by rendering prefixes
  (template.MASK_PREFIXES): a render per reply, so its ratio grows with the turns.

Encoding is `parse_conversation` + `encode_conversation`: checks, render, tokenisation with
offsets, labels. Each figure is the minimum over `--repeats` runs (timing noise on a shared
machine only adds). rows/s is 1 / encode time of one conversation, one process; training
tokenises with `data.num_proc` processes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def conversation(turns: int, seed: int = 0) -> dict:
    from clustertune.smoke.agents import _request, _summary, tool_schema
    from clustertune.smoke.conversations import weather_call

    rng = random.Random(seed)
    messages, tools = [{"role": "system", "content": "You are a helpful assistant."}], []
    for turn in range(turns):
        scenario, slots, request = _request(rng)
        messages.append({"role": "user", "content": request})
        if turn % 4 == 3:
            call_id = f"call_{turn}"
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": [weather_call("Paris", call_id)]}
            )
            messages.append(
                {"role": "tool", "name": "get_weather", "tool_call_id": call_id, "content": "sunny"}
            )
        reply = {"role": "assistant", "content": _summary(scenario, slots)}
        if turn % 3 == 2:
            reply["reasoning_content"] = f"The user asks about {scenario.topic}."
        messages.append(reply)
        tools.append(tool_schema(scenario))
    from clustertune.smoke.conversations import WEATHER_TOOL

    unique = {tool["function"]["name"]: tool for tool in [WEATHER_TOOL, *tools]}
    return {"messages": messages, "tools": list(unique.values())}


def best_of(repeats: int, work) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from clustertune import chat
    from clustertune.modeling import load_tokenizer
    from clustertune.smoke import ensure_smoke_assets

    assets = ensure_smoke_assets()
    qwen3 = load_tokenizer(str(assets["tiny_qwen3"]))
    causal = load_tokenizer(str(assets["tiny_causal"]))
    builtin = load_tokenizer(str(assets["tiny_causal"]))
    chat.resolve_chat_template(builtin, "chatml")
    ways = {
        "qwen3 via TRL's marked copy": (qwen3, chat.training_template(qwen3)),
        "built-in chatml (markers)": (builtin, chat.training_template(builtin, "chatml")),
        "prefix renders": (causal, chat.training_template(causal)),
    }
    rows = []
    print(
        f"{'way':30s} {'turns':>5s} {'tokens':>7s} {'apply ms':>9s} {'encode ms':>10s} "
        f"{'ratio':>6s} {'rows/s':>8s}"
    )
    for name, (tokenizer, template) in ways.items():
        for turns in args.turns:
            row = conversation(turns)
            uses_tools = name != "prefix renders" or turns < 64  # prefix renders are slow
            tools = row["tools"] if uses_tools else None

            def reference(tokenizer=tokenizer, messages=row["messages"], tools=tools):
                tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)

            def encode(
                tokenizer=tokenizer, template=template, messages=row["messages"], tools=tools
            ):
                parsed = chat.parse_conversation(messages, tools)
                return chat.encode_conversation(
                    tokenizer, template, parsed, train_on="assistant", max_length=1 << 30
                )

            encoded = encode()
            assert not isinstance(encoded, chat.Problem), encoded
            repeats = args.repeats if name != "prefix renders" or turns <= 16 else 1
            apply_s = best_of(repeats, reference)
            encode_s = best_of(repeats, encode)
            record = {
                "way": name,
                "turns": turns,
                "tokens": len(encoded.input_ids),
                "apply_chat_template_ms": round(1000 * apply_s, 2),
                "encode_ms": round(1000 * encode_s, 2),
                "ratio": round(encode_s / apply_s, 2),
                "rows_per_second": round(1 / encode_s, 1),
            }
            rows.append(record)
            print(
                f"{name:30s} {turns:5d} {record['tokens']:7d} {record['apply_chat_template_ms']:9.2f} "
                f"{record['encode_ms']:10.2f} {record['ratio']:6.2f} {record['rows_per_second']:8.1f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
