"""The embedded smoke assets: deterministic, shaped like DialogSum, loadable offline."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import huggingface_hub.constants
import pytest
from helpers import REPO

from clustertune import smoke
from clustertune.atomicio import read_jsonl
from clustertune.smoke import (
    CHAT_SPLITS,
    SCENARIOS,
    ensure_smoke_assets,
    generate_chats,
    generate_dialogsum_like,
)
from clustertune.smoke.scenarios import (
    CLOSING_REPLIES,
    FOLLOW_UPS,
    SLOT_LABELS,
    SYSTEM_PROMPTS,
)

FOLLOW_UP_ENDS = tuple(question.rsplit("}", 1)[1] for question in FOLLOW_UPS)  # " again?", ...
ASSET_KEYS = [
    "train",
    "validation",
    "test",
    "chat_train",
    "chat_validation",
    "chat_test",
    "agent_train",
    "agent_validation",
    "agent_test",
    "tiny_t5",
    "tiny_causal",
    "tiny_qwen3",
]


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """The same assets built twice, in separate cache folders."""
    first = ensure_smoke_assets(tmp_path_factory.mktemp("cache_a"))
    second = ensure_smoke_assets(tmp_path_factory.mktemp("cache_b"))
    return first, second


@pytest.fixture(scope="module")
def assets(two_builds) -> dict[str, Path]:
    return two_builds[0]


@pytest.fixture
def offline(monkeypatch):
    """What HF_HUB_OFFLINE=1 does, also for an already imported huggingface_hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_two_builds_are_byte_identical(two_builds):
    first, second = two_builds
    assert list(first) == ASSET_KEYS
    for key in ("train", "tiny_t5", "tiny_causal", "tiny_qwen3"):
        folder_a, folder_b = first[key], second[key]
        if folder_a.is_file():
            folder_a, folder_b = folder_a.parent, folder_b.parent
        files_a, files_b = _files(folder_a), _files(folder_b)
        assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(
            files_a
        ) or key == "train"
        assert files_a.keys() == files_b.keys()
        for name in files_a:
            assert files_a[name] == files_b[name], f"{key}/{name} differs between two builds"


def test_present_assets_are_reused_and_stale_ones_rebuilt(assets):
    cache_dir = assets["train"].parents[2]
    weights = assets["tiny_causal"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_smoke_assets(cache_dir) == assets
    assert weights.stat().st_mtime_ns == before

    (assets["tiny_causal"] / ".smoke_version").write_text("0\n")  # as if built by older code
    ensure_smoke_assets(cache_dir)
    assert (assets["tiny_causal"] / ".smoke_version").read_text().strip() == smoke.SMOKE_VERSION
    assert weights.stat().st_mtime_ns != before
    assert not [p for p in assets["tiny_causal"].parent.iterdir() if p.name.startswith(".build")]


def test_cli_prints_key_path_lines(assets, capsys):
    smoke.main(["--cache-dir", str(assets["train"].parents[2])])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{key}={assets[key]}" for key in ASSET_KEYS]


def test_generator_is_seeded_and_only_seeded():
    assert generate_dialogsum_like(20, seed=5) == generate_dialogsum_like(20, seed=5)
    assert generate_dialogsum_like(20, seed=5) != generate_dialogsum_like(20, seed=6)


def test_data_has_dialogsum_shape(assets):
    rows = {split: read_jsonl(assets[split]) for split in ("train", "validation", "test")}
    assert {split: len(split_rows) for split, split_rows in rows.items()} == {
        "train": 2000,
        "validation": 200,
        "test": 200,
    }
    train = rows["train"]
    assert len({row["id"] for row in train}) == len(train)

    turn_counts = [len(row["dialogue"].split("\n")) for row in train]
    assert set(turn_counts) == set(range(2, 11))
    for row in train[:200]:
        speakers = [line.split(":")[0] for line in row["dialogue"].split("\n")]
        assert speakers == [f"#Person{i % 2 + 1}#" for i in range(len(speakers))]

    # Lengths spread widely (so length grouping matters): 30..~260 words incl. speaker tags.
    words = [len(row["dialogue"].split()) for row in train]
    deciles = statistics.quantiles(words, n=10)
    assert min(words) >= 30 and max(words) <= 270
    assert deciles[0] < 70 and deciles[-1] > 190

    summary_words = [len(row["summary"].split()) for row in train]
    assert 8 <= min(summary_words) and max(summary_words) <= 25

    # The test split is held out and carries three paraphrased references.
    train_dialogues = {row["dialogue"] for row in train}
    for row in rows["test"]:
        assert row["dialogue"] not in train_dialogues
        assert row["summary"] == row["summary1"]
        assert len({row["summary1"], row["summary2"], row["summary3"]}) == 3


def test_summary_slots_appear_in_dialogue(assets):
    """Every summary word is either template text or a slot value copied from the dialogue."""
    scenarios = {scenario.topic: scenario for scenario in SCENARIOS}
    rows = read_jsonl(assets["test"])
    assert {row["topic"] for row in rows} == set(scenarios)
    for row in rows:
        templates = " ".join(scenarios[row["topic"]].summaries)
        template_words = set(re.findall(r"[\w'#]+", re.sub(r"\{\w+\}", " ", templates)))
        dialogue_words = set(re.findall(r"[\w'#]+", row["dialogue"]))
        for number in (1, 2, 3):
            slot_words = set(re.findall(r"[\w'#]+", row[f"summary{number}"])) - template_words
            assert slot_words, row[f"summary{number}"]
            assert slot_words <= dialogue_words, (row["id"], slot_words - dialogue_words)


def test_tokenizer_round_trips_and_appends_eos(assets, offline):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tiny_t5"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 300 < len(tokenizer) <= 2000

    rows = read_jsonl(assets["test"])
    for text in [row["summary"] for row in rows] + [row["dialogue"] for row in rows[:50]]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.unk_token_id) == 0
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("#Person1#", add_special_tokens=False).input_ids) <= 3

    causal_tokenizer = AutoTokenizer.from_pretrained(assets["tiny_causal"])
    ids = causal_tokenizer(rows[0]["summary"]).input_ids
    assert ids == tokenizer(rows[0]["summary"]).input_ids[:-1]  # no automatic </s>
    # The same ids, plus ChatML's two tokens after them; eos is the end of a chat turn.
    assert len(causal_tokenizer) == len(tokenizer) + 2
    assert causal_tokenizer.pad_token_id == 0
    assert causal_tokenizer.eos_token_id == len(tokenizer) + 1


def _batch(tokenizer, rows):
    encoded = tokenizer([row["dialogue"] for row in rows], padding=True, return_tensors="pt")
    labels = tokenizer([row["summary"] for row in rows], padding=True, return_tensors="pt")
    labels = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
    return encoded, labels


def test_tiny_t5_loads_offline_and_gives_finite_loss(assets, offline):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(assets["tiny_t5"])
    tokenizer = AutoTokenizer.from_pretrained(assets["tiny_t5"])
    config = model.config
    assert (config.d_model, config.d_ff, config.num_layers, config.num_decoder_layers) == (
        64,
        128,
        2,
        2,
    )
    assert (config.decoder_start_token_id, config.pad_token_id, config.eos_token_id) == (0, 0, 1)
    assert config.vocab_size == len(tokenizer)
    # FLAN-T5 layout: an lm_head of its own, not tied to the input embedding.
    assert not torch.equal(model.lm_head.weight, model.shared.weight)

    encoded, labels = _batch(tokenizer, read_jsonl(assets["validation"])[:4])
    loss = model(**encoded, labels=labels).loss
    # Freshly initialised: close to uniform over the vocabulary.
    assert math.isfinite(loss.item()) and loss.item() < 2 * math.log(len(tokenizer))


def test_tiny_causal_lm_loads_offline_and_gives_finite_loss(assets, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets["tiny_causal"])
    tokenizer = AutoTokenizer.from_pretrained(assets["tiny_causal"])
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.vocab_size == len(tokenizer)

    rows = read_jsonl(assets["validation"])[:4]
    texts = [f"{row['dialogue']}\nSummary: {row['summary']}" for row in rows]
    # The causal tokenizer adds no </s>: the collator appends it to each target itself.
    sequences = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts).input_ids]
    batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item()) and loss.item() < 2 * math.log(len(tokenizer))


# ------------------------------------------------------------------------------- chat


def test_causal_tokenizer_renders_chatml_with_atomic_special_tokens(assets, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tiny_causal"])
    base_vocab = len(AutoTokenizer.from_pretrained(assets["tiny_t5"]))
    im_start, im_end = base_vocab, base_vocab + 1
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [im_start, im_end]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<pad>")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Which city?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhich city?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
        "<|im_start|>assistant\nYou are welcome.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == rendered[: rendered.rindex("You are")]  # ends "<|im_start|>assistant\n"

    # One token each wherever they stand, glued to text or not; the text around is unchanged.
    ids = tokenizer("x<|im_end|>y<|im_start|>", add_special_tokens=False).input_ids
    assert ids.count(im_end) == ids.count(im_start) == 1 and ids[-1] == im_start
    assert ids[: ids.index(im_end)] == tokenizer("x", add_special_tokens=False).input_ids
    assert im_end not in tokenizer("<|im_end").input_ids  # no partial match
    rendered_ids = tokenizer(rendered).input_ids
    assert rendered_ids.count(im_start) == rendered_ids.count(im_end) == len(messages)
    assert tokenizer.decode(rendered_ids) == rendered
    assert "<|im_" not in tokenizer.decode(rendered_ids, skip_special_tokens=True)

    # The model has rows for them, and generation stops at the end of a turn.
    model = AutoModelForCausalLM.from_pretrained(assets["tiny_causal"])
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == im_end + 1
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id[0] == im_end
    assert model.generation_config.pad_token_id == 0


def _chat_rows(assets) -> dict[str, list[dict]]:
    return {split: read_jsonl(assets[split]) for split in CHAT_SPLITS}


def test_chat_data_rows_are_valid_conversations(assets):
    rows = _chat_rows(assets)
    assert {split: len(split_rows) for split, split_rows in rows.items()} == {
        split: size for split, (size, _) in CHAT_SPLITS.items()
    }
    for split_rows in rows.values():
        assert len({row["id"] for row in split_rows}) == len(split_rows)
        for row in split_rows:
            messages = row["messages"]
            roles = [message["role"] for message in messages]
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns == ["user", "assistant"] * (len(turns) // 2) and 2 <= len(turns) <= 6
            assert all(set(m) == {"role", "content"} for m in messages), row["id"]
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)

    train = rows["chat_train"]
    with_system = sum(row["messages"][0]["role"] == "system" for row in train)
    assert 0.4 < with_system / len(train) < 0.6
    exchanges = {sum(m["role"] == "assistant" for m in row["messages"]) for row in train}
    assert exchanges == {1, 2, 3}

    # Held out: no chat_test conversation is a chat_train one, and each ends with a reply
    # worth scoring (its reference), never a goodbye.
    train_conversations = {str(row["messages"]) for row in train}
    for row in rows["chat_test"]:
        assert str(row["messages"]) not in train_conversations
        assert row["messages"][-1]["content"] not in CLOSING_REPLIES


def test_chat_replies_follow_the_system_prompt_and_earlier_turns(assets):
    """What makes the data learnable: a brief-style system prompt gives brief follow-up
    answers ("Rome."), the others full ones ("The city is Rome."), and every slot value a
    follow-up answer gives was said earlier in the conversation."""
    brief = {prompt for prompt, style in SYSTEM_PROMPTS if style == 1}
    labels = "|".join(re.escape(label) for label in SLOT_LABELS.values())
    full_answer = re.compile(rf"The (?:{labels}) is (.+)\.")
    follow_ups = 0
    for row in read_jsonl(assets["chat_train"]):
        messages = row["messages"]
        is_brief = messages[0]["role"] == "system" and messages[0]["content"] in brief
        for index in range(2, len(messages)):
            question, answer = messages[index - 1]["content"], messages[index]["content"]
            if messages[index]["role"] != "assistant" or not question.endswith(FOLLOW_UP_ENDS):
                continue
            follow_ups += 1
            match = full_answer.fullmatch(answer)
            assert (match is None) == is_brief, (row["id"], answer)
            value = answer[:-1] if is_brief else match.group(1)
            earlier = " ".join(m["content"] for m in messages[: index - 1]).lower()
            assert value.lower() in earlier, (row["id"], answer)
    assert follow_ups > 300


def test_chat_lengths_vary_and_fit_the_model(assets, offline):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tiny_causal"])
    rows = read_jsonl(assets["chat_train"])
    lengths = [
        len(tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False)).input_ids)
        for row in rows
    ]
    deciles = statistics.quantiles(lengths, n=10)
    # Measured: 33 / 128 / 441 tokens (min / median / max); p10 62, p90 277.
    assert min(lengths) >= 20 and max(lengths) <= 600 < tokenizer.model_max_length
    assert deciles[0] < 80 and deciles[-1] > 200


def test_chat_generator_is_seeded_and_only_seeded():
    assert generate_chats(20, seed=5) == generate_chats(20, seed=5)
    assert generate_chats(20, seed=5) != generate_chats(20, seed=6)


def test_dialogsum_as_chat_is_the_prompt_then_the_summary():
    rows = generate_dialogsum_like(3, seed=0)
    chats = smoke.dialogsum_as_chat(rows, "Summarize:\n{dialogue}")
    assert chats[0] == {
        "messages": [
            {"role": "user", "content": "Summarize:\n" + rows[0]["dialogue"]},
            {"role": "assistant", "content": rows[0]["summary"]},
        ]
    }


def test_chat_smoke_configs_use_the_chat_assets(assets):
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.evaluation.config import EvaluateConfig

    path = REPO / "recipes" / "configs" / "smoke" / "chat_lora.yaml"
    assert any("recipes/finetune.py" in line for line in path.read_text().splitlines()[:6])
    cfg = parse_config(FinetuneConfig, ["--config", str(path)])
    assert (cfg.data.format, cfg.data.packing, cfg.peft.method) == ("chat", True, "lora")
    layout = {
        key: str(value.relative_to(assets["train"].parents[2])) for key, value in assets.items()
    }
    assert cfg.model.name_or_path == ".cache/" + layout["tiny_causal"]
    assert (cfg.data.train_file, cfg.data.eval_file) == (
        ".cache/" + layout["chat_train"],
        ".cache/" + layout["chat_validation"],
    )
    evaluate = parse_config(EvaluateConfig, ["--config", str(path.parent / "chat_evaluate.yaml")])
    assert (evaluate.data.format, evaluate.model.name_or_path) == ("chat", cfg.model.name_or_path)
    assert evaluate.data.eval_file == ".cache/" + layout["chat_test"]
