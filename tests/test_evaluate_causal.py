"""Evaluation of decoder-only models: prompts rendered exactly as training rendered them
(conversations up to their last assistant turn, text through the chat template, raw text),
the tokens generation stops at, bad conversations, what a causal run_dir gives; then for real,
a causal LoRA run evaluated on 1 process, 2 processes DDP and 2 processes ZeRO-3 (multiproc)
with byte-identical predictions.jsonl and the same rouge.json, and a base-model evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import BAD_CONVERSATIONS, REPO, describe, launch_command, run

from clustertune import chat
from clustertune.config import DataConfig, FinetuneConfig, parse_config, write_resolved_config
from clustertune.data import IGNORE_INDEX
from clustertune.errors import UserError
from clustertune.evaluation import EvaluateConfig, load_eval_set, resolve_config
from clustertune.evaluation.evalset import until_stop
from clustertune.evaluation.prompts import PromptStyle, stop_token_ids
from clustertune.training_data import load_rows, tokenize_rows, tokenize_spec

SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "Where is the station?"},
    {"role": "assistant", "content": "Two streets north."},
    {"role": "user", "content": "And the bank?"},
    {"role": "assistant", "content": "Next to it."},
]
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture()
def tokenizer(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_causal"]))


def chatml_text(messages):
    """ChatML written by hand, independently of the template engine."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def resolved_data(**values):
    args = ["--model.name_or_path=unused", *(f"--data.{k}={v}" for k, v in values.items())]
    return resolve_config(parse_config(EvaluateConfig, args))[0].data


def chat_set(tmp_path, tokenizer, conversations, **data):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations])
    return load_eval_set(
        resolved_data(eval_file=path, format="chat", **data), tokenizer, "causal", "tiny"
    )


def styled(eval_set) -> tuple[str, bool]:
    """(format, rendered with the chat template) of an eval set's prompts."""
    return eval_set.style.format, eval_set.style.chat_template


def first_trained(labels: list[int], last: bool = False) -> int:
    """Where a trained run of labels starts (the first, or the last run)."""
    starts = [
        i
        for i, label in enumerate(labels)
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
    ]
    return starts[-1] if last else starts[0]


# ----------------------------------------------------------------------------- chat prompts


def test_chat_prompt_is_the_conversation_before_its_last_reply(tmp_path, tokenizer):
    eval_set = chat_set(tmp_path, tokenizer, [TURNS, TURNS[1:3]])
    assert styled(eval_set) == ("chat", True) and eval_set.id_source == "row index"
    assert eval_set.references == [["Next to it."], ["Two streets north."]]
    expected = chatml_text(TURNS[:-1]) + GENERATION_PROMPT
    assert eval_set.prompts[0] == expected
    assert eval_set.prompt_ids[0] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # generation starts exactly where training's loss on that reply starts
    trained = chat.encode_conversation(
        tokenizer,
        chat.training_template(tokenizer),
        chat.parse_conversation(TURNS),
        train_on="assistant",
        max_length=1024,
    )
    start = first_trained(trained.labels, last=True)
    assert trained.input_ids[:start] == eval_set.prompt_ids[0]
    assert eval_set.num_truncated == 0


def test_chat_reference_columns_replace_the_last_turn(tmp_path, tokenizer):
    rows = [{"messages": TURNS, "gold": "Beside the station.", "alt": "Next door."}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    d = resolved_data(eval_file=path, format="chat", reference_columns="[gold,alt]")
    eval_set = load_eval_set(d, tokenizer, "causal", "tiny")
    assert eval_set.references == [["Beside the station.", "Next door."]]
    assert eval_set.prompts[0] == chatml_text(TURNS[:-1]) + GENERATION_PROMPT
    with pytest.raises(UserError, match="has no column 'nope'"):
        load_eval_set(
            resolved_data(eval_file=path, format="chat", reference_columns="[nope]"),
            tokenizer,
            "causal",
            "tiny",
        )


BAD_ROWS = [row for row in BAD_CONVERSATIONS if row[0] != "not a list"]


@pytest.mark.parametrize(("name", "messages", "message"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_each_bad_conversation_is_named_or_skipped(name, messages, message, tokenizer, tmp_path):
    good = TURNS[1:3]
    with pytest.raises(UserError) as error:
        chat_set(tmp_path, tokenizer, [good, good, messages, good])
    text = str(error.value)
    assert message in text and "chat.jsonl' line 3: 'messages'" in text
    assert "1 of 4 rows" in text and "data.skip_invalid_rows=true" in text
    kept = chat_set(tmp_path, tokenizer, [good, good, messages, good], skip_invalid_rows="true")
    assert kept.ids == ["0", "1", "3"]  # row numbers of the file, the bad one left out


def test_a_prompt_too_long_for_max_length_is_refused_or_skipped(tmp_path, tokenizer):
    prompt_tokens = len(tokenizer(chatml_text(TURNS[:-1]) + GENERATION_PROMPT)["input_ids"])
    rows = [TURNS[1:3], TURNS]
    with pytest.raises(UserError, match=rf"line 2: 'messages' is {prompt_tokens} tokens before"):
        chat_set(tmp_path, tokenizer, rows, max_length=prompt_tokens)  # no room for the reply
    assert len(chat_set(tmp_path, tokenizer, rows, max_length=prompt_tokens + 1).ids) == 2
    kept = chat_set(tmp_path, tokenizer, rows, max_length=prompt_tokens, skip_invalid_rows="true")
    assert kept.ids == ["0"]


# ----------------------------------------------------------------------------- text prompts


def text_rows(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "text.jsonl",
        [
            {
                "id": "a",
                "dialogue": "A: I lost my keys near the old station today.",
                "summary": "A lost keys.",
            },
            {"id": "b", "dialogue": "B: hi", "summary": "B greets."},
        ],
    )


def training_rows(path: Path, tokenizer, **data) -> list[dict]:
    cfg = DataConfig(train_file=str(path), prompt_template="Summarize: {dialogue}", **data)
    spec = tokenize_spec(cfg, "causal", tokenizer, "tiny")
    rows = load_rows(cfg, str(path), "train", "data.train_file")
    return list(tokenize_rows(rows, tokenizer, spec, cfg, str(path), "data.train_file"))


def test_text_through_the_template_is_cut_in_the_user_content_as_training_cuts_it(
    tmp_path, tokenizer
):
    path = text_rows(tmp_path)
    d = resolved_data(
        eval_file=path,
        prompt_template="'Summarize: {dialogue}'",
        reference_columns="[summary]",
        max_source_length=12,
    )
    eval_set = load_eval_set(d, tokenizer, "causal", "tiny")
    assert styled(eval_set) == ("text", True)  # null: the tokenizer has a template
    assert eval_set.num_truncated == 1  # row a: its content cut, row b: whole
    for prompt_ids, prompt, trained in zip(
        eval_set.prompt_ids,
        eval_set.prompts,
        training_rows(path, tokenizer, max_source_length=12),
        strict=True,
    ):
        # the prompt ends with the generation prompt, not inside the content ...
        assert prompt.startswith("<|im_start|>user\nSummarize:") and prompt.endswith(
            "<|im_end|>\n" + GENERATION_PROMPT
        )
        # ... and is what training put before the target, token for token
        assert prompt_ids == trained["input_ids"][: first_trained(trained["labels"])]
    assert (
        eval_set.prompts[1]
        == chatml_text([{"role": "user", "content": "Summarize: B: hi"}]) + GENERATION_PROMPT
    )


def test_raw_text_prompt_keeps_its_start_as_training(tmp_path, tokenizer):
    path = text_rows(tmp_path)
    d = resolved_data(
        eval_file=path,
        prompt_template="'Summarize: {dialogue}'",
        reference_columns="[summary]",
        max_source_length=12,
        use_chat_template="false",
    )
    eval_set = load_eval_set(d, tokenizer, "causal", "tiny")
    assert styled(eval_set) == ("text", False) and eval_set.num_truncated == 1
    raw = training_rows(path, tokenizer, max_source_length=12, use_chat_template=False)
    for prompt_ids, trained in zip(eval_set.prompt_ids, raw, strict=True):
        assert prompt_ids == trained["input_ids"][: trained["num_source_tokens"]]
    full = tokenizer("Summarize: A: I lost my keys near the old station today.")["input_ids"]
    assert eval_set.prompt_ids[0] == full[:12]


def test_a_jinja_template_file_replaces_the_tokenizers(tmp_path, tokenizer):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}"
    )
    eval_set = chat_set(tmp_path, tokenizer, [TURNS[1:3]], chat_template=str(template))
    assert eval_set.prompts == [
        "<|im_start|>user: Where is the station?<|im_end|><|im_start|>assistant: "
    ]


def test_what_the_model_cannot_take_is_refused_before_loading_it(tmp_path, smoke_assets, tokenizer):
    from clustertune.modeling import load_tokenizer

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}])
    t5_tokenizer = load_tokenizer(str(smoke_assets["tiny_t5"]))
    d = resolved_data(eval_file=path, format="chat")
    with pytest.raises(
        UserError, match="data.format: chat conversations need a decoder-only model"
    ):
        load_eval_set(d, t5_tokenizer, "seq2seq", "tiny-t5")
    # ChatML's markers are not in the T5 vocabulary: the model would have no embeddings for them
    with pytest.raises(UserError, match=r"adds <\|im_start\|>, <\|im_end\|> to the vocabulary"):
        load_eval_set(
            resolved_data(eval_file=path, format="chat", chat_template="chatml"),
            t5_tokenizer,
            "causal",
            "tiny-t5",
        )
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template; set data.chat_template=chatml"):
        load_eval_set(d, tokenizer, "causal", "tiny")
    # the built-in, whose markers this vocabulary has: the same prompts as the template saved
    builtin = resolved_data(eval_file=path, format="chat", chat_template="chatml")
    prompts = load_eval_set(builtin, tokenizer, "causal", "tiny").prompts
    assert prompts == [chatml_text(TURNS[:-1]) + GENERATION_PROMPT]
    tokenizer.chat_template = None
    # text without a template on the tokenizer: the raw prompt
    text = resolved_data(eval_file=text_rows(tmp_path), reference_columns="[summary]")
    assert styled(load_eval_set(text, tokenizer, "causal", "tiny")) == ("text", False)


# ----------------------------------------------------------------------------- stopping


def test_generation_stops_at_the_end_of_turn_token(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat_style = PromptStyle("chat", chat.training_template(tokenizer))
    raw_style = PromptStyle("text")
    assert stop_token_ids(tokenizer, chat_style, [7, im_end]) == [im_end, 7]
    assert stop_token_ids(tokenizer, raw_style, 7) == [7]  # the model's EOS only
    assert stop_token_ids(tokenizer, raw_style, None) == [tokenizer.eos_token_id]
    reply = tokenizer("Next to it.", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    new = torch.tensor([[*reply, im_end, pad, pad], [*reply, *reply[:3]]])
    rows = until_stop(new, [im_end])
    assert rows == [reply, [*reply, *reply[:3]]]
    assert tokenizer.batch_decode(rows, skip_special_tokens=True)[0] == "Next to it."


# ----------------------------------------------------------------------------- run_dir


def causal_run(folder: Path, smoke_assets, marker: dict, config_yaml: bool) -> Path:
    final = folder / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(smoke_assets["tiny_causal"])})
    )
    (final / "tokenizer_config.json").write_text("{}")  # final/ saves the tokenizer
    (final / "clustertune_final.json").write_text(
        json.dumps({"step": 1, "base_model": str(smoke_assets["tiny_causal"]), **marker})
    )
    if config_yaml:
        cfg = parse_config(FinetuneConfig, [f"--model.name_or_path={smoke_assets['tiny_causal']}"])
        write_resolved_config(cfg, folder / "config.yaml")
    return folder


CHAT_MARKER = {
    "format": "chat",
    "messages_column": "conversation",
    "tools_column": "tools",
    "template_date": "",
    "use_chat_template": None,  # null is a value (when the tokenizer has a template)
    "max_length": 300,
    "source_column": "dialogue",
    "prompt_template": "x {dialogue}",
    "max_source_length": 99,
}


def test_run_dir_gives_the_chat_settings_and_the_saved_tokenizer(tmp_path, smoke_assets):
    run_dir = causal_run(tmp_path / "chat", smoke_assets, CHAT_MARKER, config_yaml=False)
    args = [f"--run_dir={run_dir}", "--data.eval_file=x.jsonl"]
    cfg, _ = resolve_config(parse_config(EvaluateConfig, args))
    d = cfg.data
    assert (d.format, d.messages_column, d.max_length, d.use_chat_template) == (
        "chat",
        "conversation",
        300,
        None,
    )
    assert d.reference_columns is None  # the last assistant turn
    assert cfg.model.tokenizer == str(run_dir / "final") == cfg.model.adapter_path
    assert cfg.model.name_or_path == str(smoke_assets["tiny_causal"])
    # explicit eval keys win over the run's
    explicit, _ = resolve_config(
        parse_config(
            EvaluateConfig, [*args, "--data.max_length=50", "--data.reference_columns=[gold]"]
        )
    )
    assert explicit.data.max_length == 50 and explicit.data.reference_columns == ["gold"]
    # a marker from before the chat keys: read from config.yaml, whose defaults are text
    old = {k: CHAT_MARKER[k] for k in ("source_column", "prompt_template", "max_source_length")}
    old_run = causal_run(tmp_path / "old", smoke_assets, old, config_yaml=True)
    old_cfg, _ = resolve_config(parse_config(EvaluateConfig, [f"--run_dir={old_run}", args[1]]))
    assert (old_cfg.data.format, old_cfg.data.prompt_template) == ("text", "x {dialogue}")
    assert old_cfg.data.reference_columns == ["summary"]


def test_without_run_dir_the_tokenizer_is_the_adapters_or_the_models(tmp_path, smoke_assets):
    base = str(smoke_assets["tiny_causal"])
    cfg, _ = resolve_config(
        parse_config(EvaluateConfig, [f"--model.name_or_path={base}", "--data.eval_file=x.jsonl"])
    )
    assert cfg.model.tokenizer == base and cfg.data.format == "text"
    adapter = causal_run(tmp_path / "lora", smoke_assets, CHAT_MARKER, config_yaml=False) / "final"
    cfg, _ = resolve_config(
        parse_config(
            EvaluateConfig, [f"--model.adapter_path={adapter}", "--data.eval_file=x.jsonl"]
        )
    )
    assert cfg.model.tokenizer == str(adapter) and cfg.model.name_or_path == base


def test_shipped_chat_eval_config_resolves(smoke_assets):
    path = REPO / "recipes" / "configs" / "smoke" / "chat_evaluate.yaml"
    assert path.read_text().startswith("#")
    cfg, _ = resolve_config(parse_config(EvaluateConfig, ["--config", str(path)]))
    assert cfg.data.format == "chat" and cfg.data.reference_columns is None
    assert cfg.model.tokenizer == cfg.model.name_or_path == ".cache/smoke/tiny-causal"


# ----------------------------------------------------------------------------- for real

NUM_EXAMPLES, BATCH_SIZE, MAX_NEW_TOKENS = 11, 4, 12  # 3 batches: ZeRO-3 rank 1 repeats one


def outputs(eval_dir: Path) -> tuple[str, dict]:
    return (eval_dir / "predictions.jsonl").read_text(), json.loads(
        (eval_dir / "rouge.json").read_text()
    )


def evaluate(args: list[str], out: Path, launch: str | None = None) -> Path:
    command = launch_command(
        "recipes/evaluate.py",
        ["--config", "recipes/configs/smoke/chat_evaluate.yaml", f"--output_dir={out}", *args],
        launch=launch,
        nproc=2 if launch else 1,
    )
    result = run(command)
    assert result.returncode == 0, describe(result)
    assert result.stdout.count("ROUGE F x100") == 1, describe(result)  # main process only
    return out


def test_base_model_evaluates_chat_data_with_its_template(tmp_path, smoke_assets):
    out = evaluate(
        ["--data.max_examples=3", "--generation.max_new_tokens=6", "--num_bootstrap=20"],
        tmp_path / "base",
    )
    predictions, report = outputs(out)
    rows = [json.loads(line) for line in predictions.splitlines()]
    assert [r["id"] for r in rows] == ["chat_test_0", "chat_test_1", "chat_test_2"]
    assert all(r["prompt"].endswith(GENERATION_PROMPT) for r in rows)
    assert not any(
        "<|im_end|>" in r["prediction"] or "<|im_start|>" in r["prediction"] for r in rows
    )
    im_end = 1323  # the smoke tokenizer's <|im_end|>, also its EOS
    assert report["generation"]["stop_token_ids"][0] == im_end
    assert report["dataset"]["format"] == "chat" and report["dataset"]["reference_columns"] is None
    assert report["model"]["kind"] == "causal"


@pytest.fixture(scope="module")
def chat_lora_run(smoke_assets, tmp_path_factory) -> Path:
    """3 LoRA steps on chat data, one process: the adapter moves the predictions away from the
    base's while they stay varied (some stop at <|im_end|>, some run to the limit)."""
    output_dir = tmp_path_factory.mktemp("causal") / "chat-lora"
    values = {
        "model.name_or_path": smoke_assets["tiny_causal"],
        "model.dropout": 0.0,
        "data.format": "chat",
        "data.train_file": smoke_assets["chat_train"],
        "output_dir": output_dir,
        "peft.method": "lora",
        "peft.target_modules": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "train.max_steps": 3,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.learning_rate": 1e-3,
        "train.log_every_steps": 3,
    }
    result = run(launch_command("recipes/finetune.py", [f"--{k}={v}" for k, v in values.items()]))
    assert result.returncode == 0, describe(result)
    return output_dir


_EVALS: dict[str | None, Path] = {}


def evaluate_run(run_dir: Path, launch: str | None) -> Path:
    if launch not in _EVALS:
        args = [
            f"--run_dir={run_dir}",
            f"--data.max_examples={NUM_EXAMPLES}",
            f"--batch_size={BATCH_SIZE}",
            f"--generation.max_new_tokens={MAX_NEW_TOKENS}",
            "--num_bootstrap=200",
        ]
        _EVALS[launch] = evaluate(args, run_dir.parent / f"eval-{launch or 'single'}", launch)
    return _EVALS[launch]


@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["ddp", "zero3"])
def test_causal_lora_evaluation_identical_on_1_and_2_ranks(launch, chat_lora_run):
    predictions, report = outputs(evaluate_run(chat_lora_run, None))
    distributed_predictions, distributed = outputs(evaluate_run(chat_lora_run, launch))
    assert distributed_predictions == predictions  # byte for byte
    # rouge.json: the same but for how fast it ran, and on what
    throughput, distributed_throughput = report.pop("throughput"), distributed.pop("throughput")
    assert distributed == report
    assert distributed_throughput["world_size"] == 2 and throughput["world_size"] == 1
    assert distributed_throughput["generated_tokens"] == throughput["generated_tokens"]
    if launch == "zero3":  # 3 batches on 2 ranks: both make 2 generate calls, one padding
        assert distributed_throughput["strategy"] == "ZeRO-3"
        assert distributed_throughput["generate_calls_per_rank"] == 2
    rows = [json.loads(line) for line in predictions.splitlines()]
    assert [r["id"] for r in rows] == [f"chat_test_{i}" for i in range(NUM_EXAMPLES)]
    assert len({r["prediction"] for r in rows}) > 1  # not a degenerate model
    assert report["model"]["adapter_path"] == str(chat_lora_run / "final")


@pytest.mark.multiproc
def test_causal_predictions_match_plain_transformers_generate(chat_lora_run, smoke_assets):
    """Independent check of the template, left padding, stopping and decoding: the recipe's
    first batch (the 4 longest prompts) through PeftModel + apply_chat_template + generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    predictions, _ = outputs(evaluate_run(chat_lora_run, None))
    rows = {json.loads(line)["id"]: json.loads(line) for line in predictions.splitlines()}
    conversations = {
        row["id"]: row["messages"]
        for row in map(json.loads, Path(smoke_assets["chat_test"]).read_text().splitlines())
    }
    tokenizer = AutoTokenizer.from_pretrained(chat_lora_run / "final", padding_side="left")
    texts = {
        i: tokenizer.apply_chat_template(
            conversations[i][:-1], tokenize=False, add_generation_prompt=True
        )
        for i in rows
    }
    lengths = {i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]) for i in rows}
    longest = sorted(rows, key=lambda i: (-lengths[i], int(i.rsplit("_", 1)[1])))[:BATCH_SIZE]
    base = AutoModelForCausalLM.from_pretrained(smoke_assets["tiny_causal"])
    model = PeftModel.from_pretrained(base, str(chat_lora_run / "final")).eval()
    inputs = tokenizer(
        [texts[i] for i in longest], return_tensors="pt", padding=True, add_special_tokens=False
    )
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    decoded = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    assert decoded == [rows[i]["prediction"] for i in longest]
