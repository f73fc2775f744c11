"""The chat generator: seeded multi-turn conversations with an assistant about the scenarios.

A row is `{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}`: a system turn on
about half of them, then 1..3 exchanges (a user turn and the assistant's reply) of these kinds:

- request: the user asks for a scenario's service (its first core turn, slots filled, after
  0..3 small-talk sentences); the assistant confirms (the second core turn).
- summarize: the user asks for the summary of a generated dialogue (30..250 words); the
  assistant writes it. Only as the first exchange, so a conversation stays under ~600 tokens.
- follow-up: the user asks for one slot of the last request or dialogue again; the answer is
  copied from an earlier turn, a dependency that only attention across turns can learn.
- closing: thanks and a goodbye; only as the last of two or more exchanges, and never in
  chat_test, whose last reply is its evaluation reference.

Every reply is a fixed template of the reply style, which the system prompt sets (none: style
0), filled with slot values that appear in earlier turns: the assistant tokens are learnable
in a few hundred steps, and getting the style right takes reading the system turn.
`ensure_chat_data` writes the splits of `CHAT_SPLITS`; `dialogsum_as_chat` gives DialogSum-
shaped rows the shape tools such as TRL's SFTTrainer take.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from clustertune.atomicio import write_jsonl_atomic
from clustertune.smoke.dialogues import generate_dialogue
from clustertune.smoke.scenarios import (
    CHAT_SPLITS,
    CLOSING_REPLIES,
    CLOSINGS,
    FILLER,
    FOLLOW_UP_ANSWERS,
    FOLLOW_UPS,
    MAX_EXCHANGES,
    MIN_EXCHANGES,
    SCENARIOS,
    SLOT_LABELS,
    SUMMARIZE_REQUEST,
    SYSTEM_PROMPTS,
)

Message = dict[str, str]
SUMMARIZE_SHARE = 0.3  # conversations opening with a summary request (the long ones)
SYSTEM_SHARE = 0.5  # conversations with a system turn
MAX_FILLER = 3  # small-talk sentences before a request: user turns of ~10 to ~45 words


def _request(rng: random.Random, style: int) -> tuple[str, str, dict[str, str]]:
    scenario = rng.choice(SCENARIOS)
    slots = {name: rng.choice(values) for name, values in scenario.slots.items()}
    small_talk = [rng.choice(FILLER) for _ in range(rng.randint(0, MAX_FILLER))]
    request = rng.choice(scenario.short_core[0]).format(**slots)
    return " ".join([*small_talk, request]), scenario.short_core[1][style].format(**slots), slots


def _summarize(rng: random.Random, style: int) -> tuple[str, str, dict[str, str]]:
    scenario, slots, dialogue = generate_dialogue(rng)
    request = SUMMARIZE_REQUEST.format(dialogue=dialogue)
    return request, scenario.summaries[style].format(**slots), slots


def _follow_up(rng: random.Random, style: int, slots: dict[str, str]) -> tuple[str, str]:
    name = rng.choice(sorted(slots))
    label, value = SLOT_LABELS[name], slots[name]
    question = rng.choice(FOLLOW_UPS).format(label=label)
    answer = FOLLOW_UP_ANSWERS[style].format(
        label=label, value=value, Value=value[0].upper() + value[1:]
    )
    return question, answer


def generate_conversation(rng: random.Random, *, informative_last: bool = False) -> list[Message]:
    """One conversation. `informative_last`: no closing exchange, so the last reply states
    something from the conversation (a confirmation, a summary or a slot value)."""
    messages: list[Message] = []
    style = 0
    if rng.random() < SYSTEM_SHARE:
        system, style = rng.choice(SYSTEM_PROMPTS)
        messages.append({"role": "system", "content": system})
    num_exchanges = rng.randint(MIN_EXCHANGES, MAX_EXCHANGES)
    slots: dict[str, str] = {}
    for index in range(num_exchanges):
        if index == 0:
            kind = "summarize" if rng.random() < SUMMARIZE_SHARE else "request"
        else:
            closing_allowed = index == num_exchanges - 1 and not informative_last
            kind = rng.choice(("follow-up", "request") + (("closing",) if closing_allowed else ()))
        if kind == "summarize":
            user, reply, slots = _summarize(rng, style)
        elif kind == "request":
            user, reply, slots = _request(rng, style)
        elif kind == "follow-up":
            user, reply = _follow_up(rng, style, slots)
        else:
            user, reply = rng.choice(CLOSINGS), CLOSING_REPLIES[style]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def generate_chats(
    num_examples: int,
    seed: int,
    *,
    id_prefix: str = "chat",
    informative_last: bool = False,
    exclude: Iterable[list[Message]] = (),
) -> list[dict]:
    """`num_examples` rows `{"id", "messages"}`, none equal to a conversation in `exclude`
    (how the held-out splits stay apart from chat_train); the same seed gives the same rows."""
    rng = random.Random(seed)
    excluded = {json.dumps(messages) for messages in exclude}
    rows: list[dict] = []
    while len(rows) < num_examples:
        messages = generate_conversation(rng, informative_last=informative_last)
        if json.dumps(messages) not in excluded:
            rows.append({"id": f"{id_prefix}_{len(rows)}", "messages": messages})
    return rows


def ensure_chat_data(root: Path) -> dict[str, Path]:
    """Write `chat_train/chat_validation/chat_test.jsonl` under `root` unless present."""
    root = Path(root)
    (train_rows, train_seed), paths = CHAT_SPLITS["chat_train"], {}
    train = generate_chats(train_rows, train_seed, id_prefix="chat_train")
    for split, (num_examples, seed) in CHAT_SPLITS.items():
        path = paths[split] = root / f"{split}.jsonl"
        if path.exists():
            continue
        if split == "chat_train":
            rows = train
        else:
            rows = generate_chats(
                num_examples,
                seed,
                id_prefix=split,
                informative_last=split == "chat_test",
                exclude=(row["messages"] for row in train),
            )
        write_jsonl_atomic(path, rows)
    return paths


def dialogsum_as_chat(
    rows: Iterable[dict], prompt_template: str, *, target_column: str = "summary"
) -> list[dict]:
    """DialogSum-shaped rows as `{"messages": [user, assistant]}`: the prompt (`prompt_template`
    filled from the row's columns) as the user turn, the target as the assistant's reply.

    This is what clustertune trains on for `data.format: text` with `data.use_chat_template`,
    in the form that conversation-based tools take (TRL's SFTTrainer), so both can be given
    the same examples. No system turn: a template that adds a default one (Qwen2.5's) adds it
    for both.
    """
    return [
        {
            "messages": [
                {"role": "user", "content": prompt_template.format(**row)},
                {"role": "assistant", "content": str(row[target_column])},
            ]
        }
        for row in rows
    ]
