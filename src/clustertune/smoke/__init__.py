"""Smoke assets built by code, offline and deterministically: DialogSum-like data, a tokenizer
trained on it, and two tiny models (T5 encoder-decoder, Llama decoder-only).

`make smoke` and the tests use these instead of downloading anything from the Hub:

    python -m clustertune.smoke [--cache-dir DIR]   # prints train=..., tiny_t5=..., one per line

The data is made to be learnable in a few hundred optimizer steps: each summary is a fixed
template of a scenario (booking a table, buying a ticket, ...) filled with slot values that
appear verbatim in the dialogue, and small-talk filler of random length pads the dialogue
without changing the summary, so grouping by length matters as it does on real DialogSum.

The package keeps the tables apart from the code that uses them:

- `scenarios`: data only. `Scenario`, `SCENARIOS`, the filler, reactions, greetings and
  closings, `SPLITS` (rows and seed per split) and the length bounds.
- `dialogues`: the seeded generator `generate_dialogsum_like` and `ensure_smoke_data`, which
  writes the splits as JSONL.
- `assets`: `build_tokenizer`, `build_tiny_t5`, `build_tiny_causal_lm`, and
  `ensure_smoke_assets`, which builds everything once per cache folder under a file lock and
  stamps it with `SMOKE_VERSION` (bump it when anything above changes the assets).
- `cli` / `__main__`: `python -m clustertune.smoke`.

Everything is importable from `clustertune.smoke` itself, as before the split.
"""

from clustertune.smoke.assets import (
    EOS,
    PAD,
    SMOKE_VERSION,
    UNK,
    build_tiny_causal_lm,
    build_tiny_t5,
    build_tokenizer,
    default_cache_dir,
    ensure_smoke_assets,
    missing_smoke_asset_hint,
)
from clustertune.smoke.cli import main
from clustertune.smoke.dialogues import ensure_smoke_data, generate_dialogsum_like
from clustertune.smoke.scenarios import (
    MAX_TURNS,
    MAX_WORDS,
    MIN_TURNS,
    MIN_WORDS,
    SCENARIOS,
    SPLITS,
    Scenario,
)

__all__ = [
    "EOS",
    "MAX_TURNS",
    "MAX_WORDS",
    "MIN_TURNS",
    "MIN_WORDS",
    "PAD",
    "SCENARIOS",
    "SMOKE_VERSION",
    "SPLITS",
    "UNK",
    "Scenario",
    "build_tiny_causal_lm",
    "build_tiny_t5",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_smoke_assets",
    "ensure_smoke_data",
    "generate_dialogsum_like",
    "main",
    "missing_smoke_asset_hint",
]
