"""The agent generator: seeded conversations that call tools and reason, about the scenarios.

A row is `{"id", "messages", "tools"}` in the schema chat templates take (clustertune.chat):
assistant turns with `tool_calls`, `tool` messages with the result, `reasoning_content` on
reasoning replies, and the tools the conversation may call (the one it needs and at most
one other, each a JSON-schema function whose parameters are a scenario's slots). The kinds and
their shares are `AGENT_MIX`: one call; two rounds of calls; two parallel calls in one turn;
a reply that reasons first; a plain conversation from the chat generator.

Every argument value appears in the user's request and every reference code in a tool's
answer, so the calls and the replies are learnable by copying. In agent_test about half the
conversations end with the assistant's tool call (its evaluation reference is a call: scored
by exact match), the others with an informative reply.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

from clustertune.atomicio import write_jsonl_atomic
from clustertune.smoke.chats import generate_conversation
from clustertune.smoke.scenarios import (
    AGENT_MIX,
    AGENT_SPLITS,
    FILLER,
    PARALLEL_REPLY,
    REASONING,
    REASONING_FACT,
    SCENARIOS,
    SLOT_LABELS,
    SYSTEM_PROMPTS,
    TOOL_DESCRIPTION,
    TOOL_NAMES,
    TOOL_REPLIES,
    TOOL_RESULT,
    Scenario,
)

Message = dict[str, Any]


def request_slots(scenario: Scenario) -> list[str]:
    """The slots every phrasing of the scenario's request states: a tool's parameters."""
    return [
        slot
        for slot in scenario.slots
        if all("{" + slot + "}" in phrasing for phrasing in scenario.short_core[0])
    ]


# Scenarios whose request states some slot (a job interview's opening line states none).
TOOL_SCENARIOS = [scenario for scenario in SCENARIOS if request_slots(scenario)]
# Those whose confirmation needs no slot beyond the request: a reply reasoned from it alone.
REASONING_SCENARIOS = [
    scenario
    for scenario in TOOL_SCENARIOS
    if all(
        "{" + slot + "}" not in scenario.short_core[1][0]
        for slot in scenario.slots
        if slot not in request_slots(scenario)
    )
]


def tool_schema(scenario: Scenario) -> dict[str, Any]:
    """The function that serves `scenario`: one required string parameter per slot its
    request states."""
    return {
        "type": "function",
        "function": {
            "name": TOOL_NAMES[scenario.topic],
            "description": TOOL_DESCRIPTION.format(topic=scenario.topic),
            "parameters": {
                "type": "object",
                "properties": {
                    slot: {"type": "string", "description": f"the {SLOT_LABELS[slot]}"}
                    for slot in request_slots(scenario)
                },
                "required": request_slots(scenario),
            },
        },
    }


def _request(
    rng: random.Random, scenarios: list[Scenario] | None = None
) -> tuple[Scenario, dict[str, str], str]:
    scenario = rng.choice(scenarios or TOOL_SCENARIOS)
    slots = {name: rng.choice(values) for name, values in scenario.slots.items()}
    return scenario, slots, rng.choice(scenario.short_core[0]).format(**slots)


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(4))


def _call(scenario: Scenario, slots: dict[str, str], call_id: str) -> dict[str, Any]:
    arguments = {slot: slots[slot] for slot in request_slots(scenario)}
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": TOOL_NAMES[scenario.topic], "arguments": arguments},
    }


def _result(scenario: Scenario, slots: dict[str, str], call_id: str, code: str) -> Message:
    """The tool's answer: a reference code, and the slots the request did not state (a price,
    the advice) that the reply reports."""
    told = {slot: slots[slot] for slot in scenario.slots if slot not in request_slots(scenario)}
    content = json.loads(TOOL_RESULT.format(code=code)) | told
    return {
        "role": "tool",
        "name": TOOL_NAMES[scenario.topic],
        "tool_call_id": call_id,
        "content": json.dumps(content),
    }


def _tools(rng: random.Random, needed: list[Scenario]) -> list[dict[str, Any]]:
    topics = list(dict.fromkeys(s.topic for s in needed))
    others = [s.topic for s in TOOL_SCENARIOS if s.topic not in topics]
    offered = [*topics, *rng.sample(others, rng.randint(0, 1))]
    by_topic = {s.topic: s for s in TOOL_SCENARIOS}
    rng.shuffle(offered)
    return [tool_schema(by_topic[topic]) for topic in offered]


def _summary(scenario: Scenario, slots: dict[str, str]) -> str:
    """The scenario's confirmation reply (its second core turn), filled."""
    return scenario.short_core[1][0].format(**slots)


def _one_call(rng: random.Random, messages: list[Message], end_with_call: bool) -> Scenario:
    scenario, slots, request = _request(rng)
    small_talk = [rng.choice(FILLER) for _ in range(rng.randint(0, 2))]
    call_id = f"call_{len(messages)}"
    messages += [
        {"role": "user", "content": " ".join([*small_talk, request])},
        {"role": "assistant", "content": "", "tool_calls": [_call(scenario, slots, call_id)]},
    ]
    if not end_with_call:
        code = _code(rng)
        reply = rng.choice(TOOL_REPLIES).format(summary=_summary(scenario, slots), code=code)
        messages += [
            _result(scenario, slots, call_id, code),
            {"role": "assistant", "content": reply},
        ]
    return scenario


def generate_agent_conversation(
    rng: random.Random, kind: str, *, end_with_call: bool = False
) -> dict[str, Any]:
    """One row of `kind` (AGENT_MIX): {"messages", "tools"} ("tools" absent without tools)."""
    messages: list[Message] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": SYSTEM_PROMPTS[0][0]})
    if kind == "chat":
        return {"messages": messages + generate_conversation(rng, informative_last=True)}
    if kind == "reasoning":
        scenario, slots, request = _request(rng, REASONING_SCENARIOS)
        facts = " ".join(
            REASONING_FACT.format(label=SLOT_LABELS[name], value=slots[name])
            for name in request_slots(scenario)
        )
        messages += [
            {"role": "user", "content": request},
            {
                "role": "assistant",
                "reasoning_content": REASONING.format(topic=scenario.topic, facts=facts),
                "content": _summary(scenario, slots),
            },
        ]
        return {"messages": messages}
    if kind == "parallel":
        (first, slots1, request1), (second, slots2, request2) = _request(rng), _request(rng)
        calls = [_call(first, slots1, "call_a"), _call(second, slots2, "call_b")]
        messages += [
            {"role": "user", "content": f"{request1} Also: {request2}"},
            {"role": "assistant", "content": "", "tool_calls": calls},
        ]
        if not end_with_call:
            code, code2 = _code(rng), _code(rng)
            messages += [
                _result(first, slots1, "call_a", code),
                _result(second, slots2, "call_b", code2),
                {"role": "assistant", "content": PARALLEL_REPLY.format(code=code, code2=code2)},
            ]
        return {"messages": messages, "tools": _tools(rng, [first, second])}
    needed = [_one_call(rng, messages, end_with_call and kind == "tool")]
    if kind == "rounds":
        needed.append(_one_call(rng, messages, end_with_call))
    return {"messages": messages, "tools": _tools(rng, needed)}


def generate_agents(num_examples: int, seed: int, *, id_prefix: str, held_out: bool) -> list[dict]:
    """`num_examples` rows of the AGENT_MIX kinds; `held_out` (agent_test): about half end with
    the assistant's tool call. The same seed gives the same rows."""
    rng = random.Random(seed)
    kinds, weights = zip(*AGENT_MIX, strict=True)
    rows = []
    for index in range(num_examples):
        kind = rng.choices(kinds, weights)[0]
        end_with_call = held_out and kind in ("tool", "rounds", "parallel") and rng.random() < 0.6
        row = generate_agent_conversation(rng, kind, end_with_call=end_with_call)
        rows.append({"id": f"{id_prefix}_{index}", "kind": kind, **row})
    return rows


def ensure_agent_data(root: Path) -> dict[str, Path]:
    """Write `agent_train/agent_validation/agent_test.jsonl` under `root` unless present."""
    paths = {}
    for split, (num_examples, seed) in AGENT_SPLITS.items():
        path = paths[split] = Path(root) / f"{split}.jsonl"
        if not path.exists():
            rows = generate_agents(
                num_examples, seed, id_prefix=split, held_out=split == "agent_test"
            )
            write_jsonl_atomic(path, rows)
    return paths
