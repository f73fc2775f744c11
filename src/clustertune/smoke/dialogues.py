"""The DialogSum-like dialogue generator: seeded rows built from `clustertune.smoke.scenarios`.

Each summary is a fixed template of a scenario filled with slot values that appear verbatim in
the dialogue; small-talk filler of random length pads the dialogue without changing the
summary, so grouping by length matters as it does on real DialogSum. `ensure_smoke_data`
writes the three splits of `SPLITS` as JSONL.
"""

from __future__ import annotations

import random
from pathlib import Path

from clustertune.atomicio import write_jsonl_atomic
from clustertune.smoke.scenarios import (
    CLOSINGS,
    FILLER,
    GREETINGS,
    MAX_TURNS,
    MAX_WORDS,
    MIN_TURNS,
    MIN_WORDS,
    REACTIONS,
    SCENARIOS,
    SPLITS,
    Scenario,
)


def generate_dialogue(rng: random.Random) -> tuple[Scenario, dict[str, str], str]:
    """One dialogue: its scenario, the chosen slot values and the `#PersonN#: ...` text."""
    scenario = rng.choice(SCENARIOS)
    slots = {name: rng.choice(values) for name, values in scenario.slots.items()}
    num_turns = rng.randint(MIN_TURNS, MAX_TURNS)
    use_long = len(scenario.long_core) <= num_turns and rng.random() < 0.5
    core = scenario.long_core if use_long else scenario.short_core
    core_start = rng.choice(range(0, num_turns - len(core) + 1, 2))  # even: #Person1# asks

    # Each turn is a list of sentences; filler goes in front of a turn's own content (after
    # it for an opening greeting), so the request and the goodbye stay in place.
    turns: list[list[str]] = []
    for index in range(num_turns):
        if core_start <= index < core_start + len(core):
            turns.append([rng.choice(core[index - core_start]).format(**slots)])
        elif index == 0:
            turns.append([rng.choice(GREETINGS)])
        elif index == num_turns - 1:  # after the core, since the core is not last
            turns.append([rng.choice(CLOSINGS)])
        else:
            turns.append([rng.choice(FILLER + REACTIONS)])

    # More turns allow more words: 2 turns land in 30..60 words, 10 turns in 120..250.
    target_words = rng.randint(max(MIN_WORDS, 12 * num_turns), min(MAX_WORDS, 30 * num_turns))
    num_words = sum(len(s.split()) for turn in turns for s in turn)
    while num_words < target_words:
        sentence = rng.choice(FILLER)
        if num_words + len(sentence.split()) > MAX_WORDS:
            break
        index = rng.randrange(num_turns)
        is_greeting = index == 0 and core_start > 0
        turns[index].insert(len(turns[index]) if is_greeting else 0, sentence)
        num_words += len(sentence.split())

    dialogue = "\n".join(
        f"#Person{index % 2 + 1}#: {' '.join(turn)}" for index, turn in enumerate(turns)
    )
    return scenario, slots, dialogue


def generate_dialogsum_like(
    num_examples: int, seed: int, *, id_prefix: str = "smoke", with_references: bool = False
) -> list[dict]:
    """Rows shaped like DialogSum: `id`, `dialogue`, `summary`, `topic`.

    With `with_references`, also `summary1..3` (three paraphrases of the same slots,
    `summary1 == summary`) as in DialogSum's official multi-reference test split. The
    references use no randomness, so they do not change the other columns.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(num_examples):
        scenario, slots, dialogue = generate_dialogue(rng)
        row = {
            "id": f"{id_prefix}_{index}",
            "dialogue": dialogue,
            "summary": scenario.summaries[0].format(**slots),
            "topic": scenario.topic,
        }
        if with_references:
            for number, template in enumerate(scenario.summaries, start=1):
                row[f"summary{number}"] = template.format(**slots)
        rows.append(row)
    return rows


def ensure_smoke_data(root: Path) -> dict[str, Path]:
    """Write `train/validation/test.jsonl` under `root` unless present; return their paths."""
    root = Path(root)
    paths = {}
    for split, (num_examples, seed) in SPLITS.items():
        path = root / f"{split}.jsonl"
        if not path.exists():
            rows = generate_dialogsum_like(
                num_examples, seed, id_prefix=split, with_references=split == "test"
            )
            write_jsonl_atomic(path, rows)
        paths[split] = path
    return paths
