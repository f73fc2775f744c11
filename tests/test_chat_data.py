"""Conversation rows as transformers' schema defines them (tool calls, tool results, reasoning,
content parts, a tools column), reaching the template as written; what is trained with
train_on=last_assistant; bad rows and bad templates, each one line; `clustertune-data
inspect` (unit tier, and the inspect command as a subprocess)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, VENV_BIN, recipe_env

from clustertune import chat
from clustertune.config import DataConfig
from clustertune.errors import UserError
from clustertune.smoke.conversations import CONVERSATION_KINDS, WEATHER_TOOL, weather_call
from clustertune.training_data import load_rows, tokenize_rows, tokenize_spec

TOOL_ROW = CONVERSATION_KINDS["tool call"]


@pytest.fixture()
def qwen3(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_qwen3"]))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenized(path: Path, tokenizer, **data):
    cfg = DataConfig(format="chat", train_file=str(path), **data)
    spec = tokenize_spec(cfg, "causal", tokenizer, "tiny-qwen3")
    rows = load_rows(cfg, str(path), "train", "data.train_file")
    return tokenize_rows(rows, tokenizer, spec, cfg, str(path), "data.train_file")


def reference_ids(tokenizer, row: dict) -> list[int]:
    """apply_chat_template of the row as written, with the template training renders with."""
    template = chat.training_template(tokenizer)
    return tokenizer.apply_chat_template(
        row["messages"], tools=row.get("tools"), chat_template=template.text, tokenize=True
    )["input_ids"]


# ----------------------------------------------------------------------------- the schema


def test_every_key_of_a_message_reaches_the_template(qwen3, tmp_path):
    """tool_calls beside content, reasoning_content and a tools column are rendered: none is
    dropped on the way from the file to the template."""
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "reasoning_content": "The user wants the weather.",
                "tool_calls": [weather_call("Paris", "c1")],
            },
            {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [WEATHER_TOOL],
    }
    rows = tokenized(write_rows(tmp_path / "a.jsonl", [row]), qwen3)
    text = qwen3.decode(rows[0]["input_ids"])
    for expected in (
        "Let me look.",
        "The user wants the weather.",
        '"get_weather"',
        "The weather in a city.",
    ):
        assert expected.replace(" ", "") in text.replace(" ", ""), expected
    assert rows[0]["input_ids"] == reference_ids(qwen3, row)


def test_the_accepted_spellings_are_one_schema():
    """Flat tool calls, JSON-string arguments, text parts and null content are the same
    conversation as the canonical form."""
    canonical = chat.parse_conversation(TOOL_ROW["messages"], TOOL_ROW["tools"])
    flat = json.loads(json.dumps(TOOL_ROW))
    call = flat["messages"][1]
    call["content"] = None
    call["tool_calls"] = [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    flat["messages"][0]["content"] = [
        {"type": "text", "text": "Weather "},
        {"type": "text", "text": "in Paris?"},
    ]
    flat["tools"] = json.dumps([WEATHER_TOOL["function"]])  # a JSON string of flat schemas
    assert chat.parse_conversation(flat["messages"], flat["tools"]) == canonical


def test_arrow_rows_render_as_written_whatever_keys_other_rows_have(qwen3, tmp_path):
    """Two rows whose tool schemas (and messages) have different keys: datasets' Arrow storage
    gives each the union, filled with null; the template still sees each row as written. A
    JSON Lines file is read without the union; a parquet file has it, and the nulls go."""
    import datasets

    other_tool = json.loads(json.dumps(WEATHER_TOOL))
    props = other_tool["function"]["parameters"]["properties"]
    props["unit"] = {"type": "string", "enum": ["C", "F"]}
    other_tool["function"]["name"] = "get_forecast"
    first = {"messages": TOOL_ROW["messages"], "tools": [WEATHER_TOOL]}
    second = {
        "messages": [
            {"role": "user", "content": "Forecast for Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_forecast",
                            "arguments": {"city": "Rome", "unit": "C"},
                        },
                    }
                ],
            },
            {"role": "tool", "name": "get_forecast", "content": "warm"},
            {"role": "assistant", "content": "Warm.", "reasoning_content": "Read it off."},
        ],
        "tools": [other_tool],
    }
    rows = [first, second]
    jsonl = tokenized(write_rows(tmp_path / "rows.jsonl", rows), qwen3)
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    union = datasets.Dataset.from_parquet(str(parquet))[0]["tools"][0]["function"]["parameters"]
    assert union["properties"]["unit"] is None  # the union, filled with null
    from_parquet = tokenized(parquet, qwen3)
    for row, a, b in zip(rows, jsonl, from_parquet, strict=True):
        assert a["input_ids"] == b["input_ids"] == reference_ids(qwen3, row)


def test_rows_whose_values_have_other_types_load(qwen3, tmp_path):
    """Arguments as a dict in one row and a JSON string in another, content as text and as
    parts: JSON Lines rows are read one by one, never unified into one Arrow type."""
    first = json.loads(json.dumps(TOOL_ROW))
    second = json.loads(json.dumps(TOOL_ROW))
    second["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    second["messages"][0]["content"] = [{"type": "text", "text": "Weather in Paris?"}]
    rows = tokenized(write_rows(tmp_path / "mixed.jsonl", [first, second]), qwen3)
    assert rows[0]["input_ids"] == rows[1]["input_ids"]


def test_last_assistant_trains_only_the_final_reply(qwen3, tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [CONVERSATION_KINDS["two rounds"]])
    every = tokenized(path, qwen3)[0]
    last = tokenized(path, qwen3, train_on="last_assistant")[0]
    assert every["input_ids"] == last["input_ids"]
    trained = qwen3.decode([i for i in last["labels"] if i != chat.IGNORE_INDEX])
    assert "Paris is sunny, Lyon rainy." in trained and "get_weather" not in trained
    every_trained = qwen3.decode([i for i in every["labels"] if i != chat.IGNORE_INDEX])
    assert every_trained.count("get_weather") == 2
    assert 0 < last["num_target_tokens"] < every["num_target_tokens"]


# ----------------------------------------------------------------------------- bad rows


def _with_message(index: int, **changes) -> dict:
    row = json.loads(json.dumps(TOOL_ROW))
    row["messages"][index].update(changes)
    return row


BAD_ROWS = [
    (
        "tool answers no call",
        {"messages": [TOOL_ROW["messages"][0], TOOL_ROW["messages"][2], TOOL_ROW["messages"][3]]},
        "'messages' message 2 (tool) answers no tool call",
    ),
    (
        "call without a name",
        _with_message(1, tool_calls=[{"type": "function", "function": {"arguments": {}}}]),
        "tool call 1 has no function name",
    ),
    (
        "arguments not JSON",
        _with_message(1, tool_calls=[{"function": {"name": "get_weather", "arguments": "{city:"}}]),
        "(get_weather) has arguments that are not valid JSON",
    ),
    (
        "arguments a list",
        _with_message(1, tool_calls=[{"function": {"name": "get_weather", "arguments": [1]}}]),
        "has arguments that are neither a dict nor a JSON object (list)",
    ),
    (
        "tools not schemas",
        {**TOOL_ROW, "tools": [{"description": "no name"}]},
        "'tools' item 1 is not a function schema with a name",
    ),
    (
        "tools not a list",
        {**TOOL_ROW, "tools": "get_weather"},
        "'tools' is not valid JSON",
    ),
]


@pytest.mark.parametrize(("name", "row", "message"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_each_bad_row_is_one_line_or_skipped(name, row, message, qwen3, tmp_path):
    good = TOOL_ROW
    path = write_rows(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(UserError) as error:
        tokenized(path, qwen3)
    text = str(error.value)
    assert message in text, text
    assert "bad.jsonl' line 2" in text and "data.skip_invalid_rows=true" in text
    assert "\n" not in text
    kept = tokenized(path, qwen3, skip_invalid_rows=True)
    assert kept["row"] == [0, 2]


def test_a_row_the_template_rejects_is_named(base_causal, tmp_path):
    """Gemma's template raises on a system turn: that row is refused (or skipped), the line
    naming the template's own message and line."""
    from clustertune.chat.template import trl_template

    base_causal.chat_template = trl_template("gemma")
    rows = [CONVERSATION_KINDS["multi-turn"], CONVERSATION_KINDS["system"]]
    path = write_rows(tmp_path / "g.jsonl", rows)
    with pytest.raises(
        UserError,
        match=r"line 2: 'messages' is refused by the chat template "
        r"\(TemplateError: System role not supported \(template line \d+\)\)",
    ):
        tokenized(path, base_causal)
    assert tokenized(path, base_causal, skip_invalid_rows=True)["row"] == [0]


def test_a_row_with_nothing_to_train_within_max_length(qwen3, tmp_path):
    path = write_rows(tmp_path / "long.jsonl", [CONVERSATION_KINDS["two rounds"]])
    full = len(tokenized(path, qwen3)[0]["input_ids"])
    with pytest.raises(UserError, match="even up to the end of its last assistant reply"):
        tokenized(path, qwen3, train_on="last_assistant", max_length=full - 5)
    cut = tokenized(path, qwen3, max_length=full - 5)[0]  # earlier replies still fit
    assert len(cut["input_ids"]) < full - 5 and cut["source_truncated"]


def test_a_missing_messages_column_names_its_key(qwen3, tmp_path):
    path = write_rows(tmp_path / "c.jsonl", [{"conversation": TOOL_ROW["messages"]}])
    with pytest.raises(UserError, match="has no column 'messages'.*set data.messages_column"):
        tokenized(path, qwen3)
    assert len(tokenized(path, qwen3, messages_column="conversation")) == 1
    with pytest.raises(UserError, match="has no column 'tool_list'.*set data.tools_column"):
        tokenized(path, qwen3, messages_column="conversation", tools_column="tool_list")


# ----------------------------------------------------------------------------- bad templates


@pytest.fixture()
def base_causal(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_causal"]))


CHATML_LOOP = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BAD_TEMPLATES = [
    (
        "syntax error",
        "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}",
        "does not compile: TemplateSyntaxError",
        "line 2",
    ),
    (
        "undefined name",
        "{{ messages[0].nope.deeper }}" + CHATML_LOOP,
        "fails on a plain user/assistant conversation: UndefinedError",
        "line 1",
    ),
    (
        "raises always",
        "{{ raise_exception('no chats here') }}",
        "fails on a plain user/assistant conversation: TemplateError: no chats here",
        "line 1",
    ),
    (
        "never writes the reply",
        CHATML_LOOP.replace("m['content']", "(m['content'] if m['role'] != 'assistant' else 'OK')"),
        "never writes an assistant reply's content",
        "",
    ),
    (
        "markers miss the reply",
        CHATML_LOOP.replace(
            "{{ '<|im_start|>' + m['role']",
            "{% generation %}{% endgeneration %}{{ '<|im_start|>' + m['role']",
        ),
        "outside its {% generation %} markers",
        "",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "message", "line"), BAD_TEMPLATES, ids=[b[0] for b in BAD_TEMPLATES]
)
def test_a_template_fault_names_the_template_not_the_data(
    name, text, message, line, base_causal, tmp_path
):
    template = tmp_path / "t.jinja"
    template.write_text(text)
    path = write_rows(tmp_path / "rows.jsonl", [CONVERSATION_KINDS["multi-turn"]] * 3)
    with pytest.raises(UserError) as error:
        tokenized(path, base_causal, chat_template=str(template))
    text = str(error.value)
    assert message in text and str(template) in text and line in text, text
    assert "rows.jsonl" not in text and "skip_invalid_rows" not in text


def test_an_empty_template_file_and_one_that_fails_on_every_row(base_causal, tmp_path):
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    path = write_rows(tmp_path / "rows.jsonl", [TOOL_ROW] * 3)
    with pytest.raises(UserError, match="the template file .*empty.jinja' is empty"):
        tokenized(path, base_causal, chat_template=str(empty))
    # passes the probe (no tools there), fails on every row of this data (each has tools)
    tools_fail = tmp_path / "tools.jinja"
    tools_fail.write_text(
        "{% if tools %}{{ raise_exception('tools are not supported') }}{% endif %}"
        + CHATML_LOOP.replace(
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content']",
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content']",
        )
    )
    with pytest.raises(
        UserError,
        match=r"the chat template \(data.chat_template file .*tools.jinja\) fails on every row: TemplateError: tools are not supported \(template line 1\); fix the template file",
    ):
        tokenized(path, base_causal, chat_template=str(tools_fail))


# ----------------------------------------------------------------------------- inspect


def run_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "clustertune-data"), *args],
        cwd=REPO,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_inspect_shows_what_training_encodes(smoke_assets, tmp_path):
    rows = [TOOL_ROW, {"messages": "not a conversation"}, CONVERSATION_KINDS["reasoning"]]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    args = [
        "inspect",
        "--config",
        str(REPO / "recipes/configs/smoke/agent_lora.yaml"),
        f"--data.train_file={path}",
        "--rows",
        "3",
    ]
    refused = run_data(*args, "--json")
    assert refused.returncode == 2
    assert (
        refused.stderr.strip().splitlines()[-1].startswith("clustertune: error: data.train_file:")
    )
    assert "rows.jsonl' line 2: 'messages' is str, not a list" in refused.stderr
    out = run_data(*args, "--json", "--data.skip_invalid_rows=true")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["row"] for r in records] == [0, 1, 2]
    assert records[1] == {
        "row": 1,
        "skipped": "is str, not a list (a conversation is a list of {role, content} messages)",
    }
    expected = tokenized(path, load_qwen3(smoke_assets), skip_invalid_rows=True)
    for record, example in zip([records[0], records[2]], expected, strict=True):
        assert record["input_ids"] == example["input_ids"] and record["labels"] == example["labels"]
    text = run_data(*args[:-2], "--rows", "1")
    assert text.returncode == 0 and "[[" in text.stdout and "get_weather" in text.stdout


def load_qwen3(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_qwen3"]))


def test_inspect_equals_the_first_batch_a_training_run_takes(tmp_path):
    """The rows of the first micro-batch a (packed) training run of the agent smoke config
    feeds its model, built by the Trainer itself, equal what `inspect --json` prints for
    those rows, collated the same way."""
    import torch

    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.train import Trainer

    config = str(REPO / "recipes/configs/smoke/agent_lora.yaml")
    overrides = [f"--output_dir={tmp_path / 'run'}", "--train.max_steps=1", "--data.eval_file=null"]
    trainer = Trainer(parse_config(FinetuneConfig, ["--config", config, *overrides]))
    try:
        assert trainer.setup()
        plan = trainer.plan
        indices, _ = plan.rank_micro_batches(plan.global_batches(0)[0])[0]
        batch = trainer.data.collate(indices, trainer.data.train, "cpu")
        rows = trainer.data.train[[int(i) for i in indices]]["row"]
        collator = trainer.data.collator
    finally:
        trainer.runtime.shutdown()
    out = run_data(
        "inspect", "--config", config, *overrides, "--json", "--rows", str(max(rows) + 1)
    )
    assert out.returncode == 0, out.stderr
    records = {r["row"]: r for r in map(json.loads, out.stdout.splitlines())}
    inspected = collator([records[row] for row in rows])
    assert set(inspected) == set(batch) and "position_ids" in batch  # packed
    for key, tensor in batch.items():
        assert torch.equal(inspected[key], tensor), key
