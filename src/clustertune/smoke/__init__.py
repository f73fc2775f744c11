"""Smoke assets built by code, offline and deterministically: DialogSum-like data, chat data, a
tokenizer trained on the dialogues, and two tiny models (T5 encoder-decoder, Llama
decoder-only with a ChatML template).

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
- `chats`: `generate_chats` (multi-turn conversations with an assistant about the same
  scenarios, system prompts on about half) and `ensure_chat_data`, which writes
  `chat_train/chat_validation/chat_test.jsonl` beside the dialogues; `dialogsum_as_chat`.
- `assets`: `build_tokenizer`, `build_tiny_t5`, `build_tiny_causal_lm` (ChatML template,
  `<|im_start|>`/`<|im_end|>` special tokens, eos `<|im_end|>`), and
  `ensure_smoke_assets`, which builds everything once per cache folder under a file lock and
  stamps it with `SMOKE_VERSION` (bump it when anything above changes the assets).
- `cli` / `__main__`: `python -m clustertune.smoke`.

Everything is importable from `clustertune.smoke` itself, as before the split.
"""

from clustertune.smoke.assets import (
    CHATML_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
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
from clustertune.smoke.chats import (
    dialogsum_as_chat,
    ensure_chat_data,
    generate_chats,
    generate_conversation,
)
from clustertune.smoke.cli import main
from clustertune.smoke.dialogues import ensure_smoke_data, generate_dialogsum_like
from clustertune.smoke.scenarios import (
    CHAT_SPLITS,
    MAX_TURNS,
    MAX_WORDS,
    MIN_TURNS,
    MIN_WORDS,
    SCENARIOS,
    SPLITS,
    Scenario,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CHAT_SPLITS",
    "EOS",
    "IM_END",
    "IM_START",
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
    "dialogsum_as_chat",
    "ensure_chat_data",
    "ensure_smoke_assets",
    "ensure_smoke_data",
    "generate_chats",
    "generate_conversation",
    "generate_dialogsum_like",
    "main",
    "missing_smoke_asset_hint",
]
