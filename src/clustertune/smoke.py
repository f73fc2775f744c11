"""Smoke assets built by code, offline and deterministically: DialogSum-like data, a tokenizer
trained on it, and two tiny models (T5 encoder-decoder, Llama decoder-only).

`make smoke` and the tests use these instead of downloading anything from the Hub:

    python -m clustertune.smoke [--cache-dir DIR]   # prints train=..., tiny_t5=..., one per line

The data is made to be learnable in a few hundred optimizer steps: each summary is a fixed
template of a scenario (booking a table, buying a ticket, ...) filled with slot values that
appear verbatim in the dialogue, and small-talk filler of random length pads the dialogue
without changing the summary, so grouping by length matters as it does on real DialogSum.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import shutil
import string
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clustertune.atomicio import read_jsonl, write_jsonl_atomic

if TYPE_CHECKING:  # imported inside functions: the cached path stays fast (no torch import)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

# Bump when the generator, tokenizer or model shapes change: cached folders with another
# stamp are rebuilt instead of silently serving stale assets.
SMOKE_VERSION = "1"
_STAMP_FILE = ".smoke_version"

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as T5 expects

SPLITS = {  # split name -> (rows, seed); test is held out: no seed is shared with train
    "train": (2000, 0),
    "validation": (200, 1),
    "test": (200, 2),
}

# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A dialogue type: slot values, core turns that state them, and summary templates.

    Each core turn is a tuple of alternative phrasings; turns alternate #Person1#, #Person2#
    starting with #Person1#. `summaries[0]` is the training target, all three are the test
    references (paraphrases of the same slots).
    """

    topic: str
    slots: dict[str, tuple[str, ...]]
    short_core: tuple[tuple[str, ...], ...]
    long_core: tuple[tuple[str, ...], ...]
    summaries: tuple[str, str, str]


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        topic="restaurant booking",
        slots={
            "party": ("two", "three", "four", "five", "six", "eight"),
            "time": ("six", "seven", "eight", "nine", "half past seven"),
            "restaurant": (
                "Luigi's",
                "the Golden Dragon",
                "Cafe Rosa",
                "the Blue Moon",
                "Sakura House",
                "the Old Mill",
            ),
        },
        short_core=(
            (
                "I would like to book a table for {party} at {restaurant} at {time}.",
                "Can I reserve a table for {party} people at {restaurant}? We will come at {time}.",
            ),
            (
                "Certainly. A table for {party} at {time}. See you tonight.",
                "No problem, your table for {party} is ready at {time}.",
            ),
        ),
        long_core=(
            ("Hello, is this {restaurant}?", "Hi, I am calling {restaurant}, right?"),
            ("Yes, it is. How can I help you?", "That is right. What can I do for you?"),
            (
                "I need a table for {party} tonight.",
                "I want to book a table for {party} people tonight.",
            ),
            ("What time would you like?", "Sure. At what time?"),
            ("At {time}, please.", "We will be there at {time}."),
        ),
        summaries=(
            "#Person1# books a table for {party} at {time} at {restaurant}.",
            "#Person1# reserves a table at {restaurant} for {party} people at {time}.",
            "#Person2# helps #Person1# book a table for {party} at {restaurant} at {time}.",
        ),
    ),
    Scenario(
        topic="train tickets",
        slots={
            "count": ("two", "three", "four", "five"),
            "city": ("Paris", "London", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Dublin"),
            "day": _DAYS,
        },
        short_core=(
            (
                "I would like {count} tickets to {city} for {day}, please.",
                "Can I buy {count} train tickets to {city}? I want to travel on {day}.",
            ),
            (
                "Here are your {count} tickets to {city}. The train leaves on {day} morning.",
                "OK, {count} tickets to {city} on {day}. Have a good trip.",
            ),
        ),
        long_core=(
            ("I want to go to {city}.", "Do you have trains to {city}?"),
            ("When do you want to travel?", "Sure. What day?"),
            ("On {day}, please.", "This {day}, if possible."),
            ("How many tickets?", "How many people are going?"),
            ("I need {count} tickets, please.", "We need {count} tickets."),
        ),
        summaries=(
            "#Person1# buys {count} tickets to {city} for {day}.",
            "#Person1# gets {count} train tickets to {city} for {day}.",
            "#Person2# sells #Person1# {count} tickets to {city} for {day}.",
        ),
    ),
    Scenario(
        topic="asking directions",
        slots={
            "place": (
                "museum",
                "bank",
                "train station",
                "library",
                "post office",
                "city hall",
                "cinema",
                "market",
            ),
            "street": ("Green", "Oak", "Maple", "King", "River", "Park", "Church", "Hill"),
            "direction": ("left", "right"),
        },
        short_core=(
            (
                "Excuse me, how do I get to the {place}?",
                "Sorry, can you tell me where the {place} is?",
            ),
            (
                "Go straight and turn {direction} onto {street} Street. You will see the {place} there.",
                "Turn {direction} onto {street} Street and the {place} is right in front of you.",
            ),
        ),
        long_core=(
            ("Excuse me, I think I am lost.", "Sorry to bother you, but I am lost."),
            ("Where do you want to go?", "Where are you going?"),
            ("I am looking for the {place}.", "I need to find the {place}."),
            (
                "Turn {direction} at the corner onto {street} Street and you will find it.",
                "It is on {street} Street. Turn {direction} at the lights.",
            ),
        ),
        summaries=(
            "#Person2# tells #Person1# to turn {direction} onto {street} Street to get to the {place}.",
            "#Person1# asks the way to the {place} and #Person2# says to turn {direction} onto {street} Street.",
            "#Person1# wants to find the {place}, which is on {street} Street.",
        ),
    ),
    Scenario(
        topic="job interview",
        slots={
            "name": ("Tom", "Anna", "Peter", "Lisa", "David", "Maria", "James", "Emma"),
            "job": (
                "teacher",
                "driver",
                "cook",
                "nurse",
                "engineer",
                "designer",
                "manager",
                "writer",
            ),
            "years": ("two", "three", "four", "five", "six", "ten"),
        },
        short_core=(
            (
                "Thank you for coming. Please tell me about yourself.",
                "Please have a seat and tell me why you want this job.",
            ),
            (
                "My name is {name}. I want the {job} job, and I have {years} years of experience.",
                "I am {name}. I have worked as a {job} for {years} years.",
            ),
        ),
        long_core=(
            (
                "Good morning. Please have a seat. What is your name?",
                "Hello. Can you tell me your name?",
            ),
            (
                "My name is {name}. I am here for the {job} job.",
                "I am {name}, and I applied for the {job} job.",
            ),
            ("How much experience do you have?", "How long have you done this kind of work?"),
            ("I have {years} years of experience.", "I have done it for {years} years."),
        ),
        summaries=(
            "#Person1# interviews {name} for the {job} job, and {name} has {years} years of experience.",
            "{name} has {years} years of experience and applies for the {job} job.",
            "#Person1# talks with {name}, who wants the {job} job and has worked for {years} years.",
        ),
    ),
    Scenario(
        topic="doctor visit",
        slots={
            "symptom": ("headache", "cough", "fever", "sore throat", "stomach ache", "back pain"),
            "duration": ("two days", "three days", "four days", "a week", "two weeks"),
            "advice": (
                "rest at home",
                "drink more water",
                "take this medicine",
                "stay in bed",
                "eat less sugar",
            ),
        },
        short_core=(
            (
                "Doctor, I have had a {symptom} for {duration}.",
                "I have had a bad {symptom} for {duration}, doctor.",
            ),
            (
                "I see. You should {advice} and come back if it gets worse.",
                "It is not serious. You should {advice}.",
            ),
        ),
        long_core=(
            ("Good morning, doctor.", "Hello, doctor. Thank you for seeing me."),
            ("Good morning. What seems to be the problem?", "What can I do for you today?"),
            ("I have a bad {symptom}.", "I have a {symptom} and I feel tired."),
            ("How long have you had it?", "When did it start?"),
            ("For about {duration}.", "I have had it for {duration}."),
            ("You should {advice}.", "Please {advice} and call me if it gets worse."),
        ),
        summaries=(
            "#Person1# has had a {symptom} for {duration}, and #Person2# tells #Person1# to {advice}.",
            "#Person2# advises #Person1#, who has had a {symptom} for {duration}, to {advice}.",
            "#Person1# sees a doctor about a {symptom} and is told to {advice}.",
        ),
    ),
    Scenario(
        topic="hotel check-in",
        slots={
            "hotel": (
                "the Grand Hotel",
                "the Sea View Hotel",
                "the Park Inn",
                "the Royal Hotel",
                "the Star Hotel",
                "the Lake House",
            ),
            "nights": ("two", "three", "four", "five", "seven"),
            "room": ("single", "double", "family", "quiet"),
        },
        short_core=(
            (
                "I would like a {room} room at {hotel} for {nights} nights.",
                "Hello, I have a booking at {hotel}. I need a {room} room for {nights} nights.",
            ),
            (
                "Welcome. Your {room} room is ready. Enjoy your {nights} nights with us.",
                "Here is the key to your {room} room. Enjoy your stay.",
            ),
        ),
        long_core=(
            ("Good evening. Is this {hotel}?", "Hello, I would like to check in to {hotel}."),
            ("Yes. How long will you stay?", "Welcome. How many nights will you stay?"),
            ("For {nights} nights, please.", "I will stay {nights} nights."),
            ("What kind of room would you like?", "Which room would you like?"),
            ("A {room} room, please.", "I would like a {room} room."),
        ),
        summaries=(
            "#Person1# checks into {hotel} for {nights} nights and asks for a {room} room.",
            "#Person1# gets a {room} room at {hotel} for {nights} nights.",
            "#Person2# gives #Person1# a {room} room at {hotel} for {nights} nights.",
        ),
    ),
    Scenario(
        topic="shopping",
        slots={
            "color": ("red", "blue", "black", "white", "green", "brown"),
            "item": ("jacket", "shirt", "bag", "hat", "scarf", "sweater", "coat"),
            "price": ("twenty", "thirty", "forty", "fifty", "sixty", "eighty"),
        },
        short_core=(
            ("How much is this {color} {item}?", "I like this {color} {item}. What is the price?"),
            (
                "It is {price} dollars. It is a good choice.",
                "That one is {price} dollars, and it looks great on you.",
            ),
        ),
        long_core=(
            (
                "Excuse me, do you sell a {item} like this one?",
                "Hi, I am looking for a new {item}.",
            ),
            ("Yes. What color would you like?", "Sure. Which color do you want?"),
            ("I would like a {color} one.", "Do you have it in {color}?"),
            ("Here you are. It is {price} dollars.", "Yes, we do. It costs {price} dollars."),
            ("Good, I will take it.", "That is fine. I will buy it."),
        ),
        summaries=(
            "#Person1# buys a {color} {item} for {price} dollars.",
            "#Person1# pays {price} dollars for a {color} {item}.",
            "#Person2# sells #Person1# a {color} {item} for {price} dollars.",
        ),
    ),
    Scenario(
        topic="meeting",
        slots={
            "name": (
                "Mr. Johnson",
                "Ms. Lee",
                "Mr. Smith",
                "Ms. Clark",
                "Dr. Wilson",
                "Mrs. Taylor",
            ),
            "day": _DAYS[:5],
            "time": ("ten", "eleven", "two", "three", "four"),
        },
        short_core=(
            (
                "I would like to meet {name} on {day} at {time}.",
                "Can I see {name} on {day} at {time}?",
            ),
            (
                "{name} is free on {day} at {time}. I will put it in the calendar.",
                "Yes, {day} at {time} is fine for {name}.",
            ),
        ),
        long_core=(
            ("I need to see {name} this week.", "Is {name} in the office this week?"),
            ("Which day is good for you?", "What day would you like?"),
            ("How about {day}?", "Would {day} be possible?"),
            ("That is fine. What time?", "OK. At what time?"),
            ("At {time}, if possible.", "I can come at {time}."),
        ),
        summaries=(
            "#Person1# makes an appointment to meet {name} on {day} at {time}.",
            "#Person2# arranges a meeting for #Person1# with {name} on {day} at {time}.",
            "#Person1# will meet {name} at {time} on {day}.",
        ),
    ),
)

# Small talk that pads dialogues to a random length; it never carries a slot value.
_FILLER = (
    "It is really cold today.",
    "I hope it does not rain later.",
    "The traffic was terrible this morning.",
    "I did not sleep well last night.",
    "My sister is visiting me soon.",
    "Have you seen the new film everyone talks about?",
    "I have been so busy at work lately.",
    "The weather has been lovely recently.",
    "I am trying to drink less coffee.",
    "My neighbor has a new dog.",
    "We are painting the kitchen this month.",
    "I just finished a very long book.",
    "The bus was late again today.",
    "I think I need a holiday soon.",
    "My phone battery is almost empty.",
    "I went running yesterday.",
    "Our team lost the game last night.",
    "I am learning to play the guitar.",
    "It feels like summer is almost here.",
    "My brother just moved to a new flat.",
    "The garden looks beautiful in spring.",
    "I forgot my umbrella at home.",
    "My children love the new playground.",
    "I have to call my mother tonight.",
    "The shops are very busy these days.",
    "I could not find a place to park.",
    "This city gets more crowded every year.",
    "I really like your shoes.",
    "Do you know a good place for lunch around here?",
    "I am sorry, I am a little tired.",
    "I started cooking at home more often.",
    "Everything is so expensive now.",
)
_REACTIONS = (
    "Oh, really?",
    "I know what you mean.",
    "That sounds nice.",
    "Yes, I agree.",
    "I see.",
    "That is a pity.",
    "Me too.",
    "Good for you.",
    "Not at all.",
    "Right.",
)
_GREETINGS = ("Good morning.", "Hello.", "Hi there.", "Good afternoon.", "Excuse me.")
_CLOSINGS = ("Thank you very much.", "Goodbye.", "Have a nice day.", "Thanks for your help.")

MIN_TURNS, MAX_TURNS = 2, 10
MIN_WORDS, MAX_WORDS = 30, 250


def _generate_example(rng: random.Random) -> tuple[Scenario, dict[str, str], str]:
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
            turns.append([rng.choice(_GREETINGS)])
        elif index == num_turns - 1:  # after the core, since the core is not last
            turns.append([rng.choice(_CLOSINGS)])
        else:
            turns.append([rng.choice(_FILLER + _REACTIONS)])

    # More turns allow more words: 2 turns land in 30..60 words, 10 turns in 120..250.
    target_words = rng.randint(max(MIN_WORDS, 12 * num_turns), min(MAX_WORDS, 30 * num_turns))
    num_words = sum(len(s.split()) for turn in turns for s in turn)
    while num_words < target_words:
        sentence = rng.choice(_FILLER)
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
        scenario, slots, dialogue = _generate_example(rng)
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


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A T5-style BPE tokenizer trained on `texts`: `<pad>`=0, `</s>`=1, `<unk>`=2, and `</s>`
    appended to every encoded sequence.

    Pre-tokenization is SentencePiece-like (spaces become `▁`, kept inside tokens) with
    newlines split off as their own token, so decoding restores the text exactly and a
    frequent word such as `#Person1#:` becomes a single token. The result depends only on
    `texts`: the same texts give the same ids in every build.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            # "first": no `▁` after a newline, so "a\nb" decodes back to "a\nb", not "a \n b".
            pre_tokenizers.Metaspace(prepend_scheme="first"),
        ]
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        # Every printable ASCII character, so unseen words split into characters, not <unk>.
        initial_alphabet=sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n"}),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, backend.token_to_id(EOS))],
    )
    return _wrap(backend)


def _wrap(backend: Tokenizer, padding_side: str = "right") -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side=padding_side,
        model_max_length=512,  # the longest smoke dialogue is ~330 tokens
        clean_up_tokenization_spaces=False,  # decoding is already exact
    )


def _causal_tokenizer(
    tokenizer: PreTrainedTokenizerFast, padding_side: str
) -> PreTrainedTokenizerFast:
    """The same vocabulary without the automatic `</s>`, as Llama/GPT-2 tokenizers behave.

    A decoder-only example is prompt + target in one sequence, so the collator appends
    `tokenizer.eos_token_id` to the target itself; an automatic `</s>` after the prompt would
    teach the model to stop before answering.
    """
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B", special_tokens=[]
    )
    return _wrap(backend, padding_side)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def build_tiny_t5(tokenizer: PreTrainedTokenizerFast, path: Path, seed: int = 0) -> Path:
    """Save a 2+2-layer, 64-dim T5 v1.1-style model (gated-GELU, untied head) and the tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_ff=128,
        d_kv=16,  # 4 heads * 16 = d_model
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / FLAN-T5
        tie_word_embeddings=False,  # T5 v1.1 / FLAN-T5
        dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # transformers 5 forces `config.tie_word_embeddings=True` for T5 and reads our False as
    # "v1.1: do not scale decoder outputs"; the head is then tied to `shared` at init. Give it
    # its own weights, as FLAN-T5 checkpoints have, so both tensors are saved and loading keeps
    # them apart (explicit `tie_weights()`/`resize_token_embeddings()` would re-tie them, as
    # they would FLAN-T5's). std d_model**-0.5 puts initial logits at unit scale: loss ~ ln(V).
    if model.lm_head.weight is model.shared.weight:
        lm_head = torch.empty_like(model.shared.weight).normal_(std=config.d_model**-0.5)
        model.lm_head.weight = torch.nn.Parameter(lm_head)
    path = Path(path)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast, path: Path, seed: int = 0, padding_side: str = "right"
) -> Path:
    """Save a 2-layer, 64-dim Llama and a copy of the tokenizer that does not append `</s>`.

    `padding_side="right"` suits training; batched generation wants "left", which a recipe
    can set on the loaded tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,  # prompt (~330 tokens max) + summary (~35) fits easily
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # the smoke tokenizer has no BOS
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    _causal_tokenizer(tokenizer, padding_side).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLUSTERTUNE_CACHE") or Path.home() / ".cache" / "clustertune")


def _is_current(folder: Path) -> bool:
    stamp = folder / _STAMP_FILE
    return stamp.is_file() and stamp.read_text().strip() == SMOKE_VERSION


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise builders across processes (ranks, parallel test workers) on one cache."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _publish(build_dir: Path, final: Path) -> None:
    """Stamp a finished build and rename it into place, replacing a stale folder if any."""
    (build_dir / _STAMP_FILE).write_text(SMOKE_VERSION + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for file in build_dir.iterdir():  # save_pretrained writes 0600 weights; a cache may be shared
        file.chmod(0o666 & ~umask)
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(build_dir, final)


def ensure_smoke_assets(cache_dir: Path | None = None) -> dict[str, Path]:
    """Build (once) and return the smoke data splits and the two tiny models.

    Layout under `cache_dir` (default `$CLUSTERTUNE_CACHE` or `~/.cache/clustertune`):
    `smoke/data/{train,validation,test}.jsonl`, `smoke/tiny-t5/`, `smoke/tiny-causal/`.
    Each folder is built in a temporary folder and renamed into place under a file lock, so
    concurrent callers never see half-written assets. Returns at once when present; building
    takes ~2 s plus importing torch and transformers.
    """
    root = Path(cache_dir or default_cache_dir()) / "smoke"
    folders = {
        "data": root / "data",
        "tiny_t5": root / "tiny-t5",
        "tiny_causal": root / "tiny-causal",
    }
    paths = {split: folders["data"] / f"{split}.jsonl" for split in SPLITS}
    paths |= {"tiny_t5": folders["tiny_t5"], "tiny_causal": folders["tiny_causal"]}
    if all(_is_current(folder) for folder in folders.values()):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / ".lock"):
        tokenizer = None
        for key, folder in folders.items():  # data first: the tokenizer is trained on it
            if _is_current(folder):
                continue  # present, or another process built it while we waited for the lock
            build_dir = root / f".build-{folder.name}-{os.getpid()}"  # not mkdtemp: mode 0700
            shutil.rmtree(build_dir, ignore_errors=True)  # left by a crashed run with our pid
            build_dir.mkdir()
            try:
                if key == "data":
                    ensure_smoke_data(build_dir)
                else:
                    if tokenizer is None:
                        tokenizer = _smoke_tokenizer(paths["train"])
                    build_model = build_tiny_t5 if key == "tiny_t5" else build_tiny_causal_lm
                    build_model(tokenizer, build_dir)
                _publish(build_dir, folder)
            finally:
                shutil.rmtree(build_dir, ignore_errors=True)
    return paths


def _smoke_tokenizer(train_path: Path) -> PreTrainedTokenizerFast:
    """The smoke tokenizer, trained on the train split's dialogues and summaries."""
    rows = read_jsonl(train_path)
    return build_tokenizer(text for row in rows for text in (row["dialogue"], row["summary"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clustertune.smoke",
        description="Build the offline smoke assets if missing and print them as key=path lines.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to build them (default: $CLUSTERTUNE_CACHE or ~/.cache/clustertune)",
    )
    args = parser.parse_args(argv)
    # stdout carries only the key=path lines a Makefile reads; libraries imported while
    # building (DeepSpeed's accelerator probe) print there, so send them to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        paths = ensure_smoke_assets(args.cache_dir)
    for key, path in paths.items():
        print(f"{key}={path}")


if __name__ == "__main__":
    main()
