"""Packing and token-budget micro-batches change how examples are laid out, never the loss:
per-step losses equal those of padded example-count micro-batches (fp32, dropout 0) on 1 and
2 ranks, DDP and ZeRO-2, which is the proof that attention stays inside packed examples and
that every example is counted once, whatever the micro-batch layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import describe, launch_command, run, train_losses

pytestmark = pytest.mark.multiproc

STEPS = 4
RELATIVE = 1e-5
_RUNS: dict[str, tuple[Path, str]] = {}


def chat_args(assets, output_dir, **overrides) -> list[str]:
    data = Path(assets["train"]).parent
    values = {
        "model.name_or_path": assets["tiny_causal"],
        "model.dropout": 0.0,
        "data.format": "chat",
        "data.train_file": data / "chat_train.jsonl",
        "data.eval_file": data / "chat_validation.jsonl",
        "data.max_eval_examples": 16,
        "output_dir": output_dir,
        "train.max_steps": STEPS,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 4,
        "train.learning_rate": 1e-3,
        "train.log_every_steps": 1,
    }
    values.update(overrides)
    return [f"--{key}={value}" for key, value in values.items()]


LAYOUTS = {  # name: (launch file or None for one plain process, processes, overrides)
    "padded-1": (None, 1, {}),
    "packed-1": (None, 1, {"data.packing": "true"}),
    "packed-ddp-2": ("ddp", 2, {"data.packing": "true"}),
    "packed-zero2-2": ("zero2", 2, {"data.packing": "true"}),
    "budget-padded-1": (None, 1, {"train.micro_batch_tokens": 1200}),
    "budget-padded-ddp-2": ("ddp", 2, {"train.micro_batch_tokens": 1200}),
    "budget-packed-zero2-2": (
        "zero2",
        2,
        {"train.micro_batch_tokens": 1200, "data.packing": "true"},
    ),
}


def layout_run(name: str, assets, tmp_path_factory) -> tuple[Path, str]:
    if name not in _RUNS:
        launch, nproc, overrides = LAYOUTS[name]
        out = tmp_path_factory.mktemp("packing") / name
        command = launch_command(
            "recipes/finetune.py", chat_args(assets, out, **overrides), launch=launch, nproc=nproc
        )
        result = run(command)
        assert result.returncode == 0, describe(result)
        _RUNS[name] = (out, result.stdout)
    return _RUNS[name]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_losses(out: Path) -> list[float]:
    return [r["eval_loss"] for r in records(out) if "eval_loss" in r]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "padded-1"])
def test_layout_gives_the_losses_of_padded_example_batches(name, smoke_assets, tmp_path_factory):
    reference, _ = layout_run("padded-1", smoke_assets, tmp_path_factory)
    out, stdout = layout_run(name, smoke_assets, tmp_path_factory)
    expected, actual = train_losses(reference), train_losses(out)
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in expected:
        assert abs(actual[step] - expected[step]) <= RELATIVE * expected[step], (step, name)
    for got, want in zip(eval_losses(out), eval_losses(reference), strict=True):
        assert abs(got - want) <= RELATIVE * want
    assert eval_losses(out)[-1] < eval_losses(out)[0]
    efficiency = [r["padding_efficiency"] for r in records(out) if "padding_efficiency" in r]
    if "packed" in name:
        assert "packing: attention stays inside each example" in stdout
        assert efficiency == [1.0] * STEPS  # no padding slot in a packed row
    else:
        assert all(e < 1.0 for e in efficiency)
    if "budget" in name:
        assert "micro-batches of at most 1,200 tokens" in stdout


def test_auto_token_budget_is_agreed_by_all_ranks(smoke_assets, tmp_path_factory):
    from helpers import recipe_env

    reference, _ = layout_run("padded-1", smoke_assets, tmp_path_factory)
    out = tmp_path_factory.mktemp("packing") / "auto-tokens"
    overrides = {
        "train.micro_batch_tokens": "auto",
        "train.auto_batch_margin": 0.0,
        "data.packing": "true",
    }
    command = launch_command(
        "recipes/finetune.py", chat_args(smoke_assets, out, **overrides), launch="zero2", nproc=2
    )
    # rank 0 could take 4 worst-case examples in one packed row, rank 1 only 3: both use 3
    result = run(command, env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE="4,3"))
    assert result.returncode == 0, describe(result)
    (record,) = [r for r in records(out) if r.get("event") == "auto_batch"]
    worst = record["worst_case_shape"]
    assert record["largest_fitting"] == 3
    assert record["chosen"] == 3 * (worst["source_tokens"] + worst["target_tokens"])
    assert f"micro-batches of at most {record['chosen']:,} tokens (packed)" in result.stdout
    expected, actual = train_losses(reference), train_losses(out)
    for step in expected:
        assert abs(actual[step] - expected[step]) <= RELATIVE * expected[step], step


def test_chat_smoke_config_end_to_end(smoke_assets, tmp_path):
    """The shipped chat smoke (packed LoRA, 2-process ZeRO-2), shortened."""
    from peft import PeftConfig

    out = tmp_path / "chat-smoke"
    args = [
        "--config",
        "recipes/configs/smoke/chat_lora.yaml",
        f"--output_dir={out}",
        f"--model.name_or_path={smoke_assets['tiny_causal']}",
        f"--data.train_file={Path(smoke_assets['train']).parent / 'chat_train.jsonl'}",
        f"--data.eval_file={Path(smoke_assets['train']).parent / 'chat_validation.jsonl'}",
        "--data.max_eval_examples=32",
        "--train.max_steps=30",
        "--train.eval_every_steps=0",
        "--checkpoint.every_steps=0",
    ]
    result = run(launch_command("recipes/finetune.py", args, launch="zero2", nproc=2))
    assert result.returncode == 0, describe(result)
    before, after = eval_losses(out)
    assert after < before - 0.5, (before, after)
    assert PeftConfig.from_pretrained(out / "final").base_model_name_or_path
    assert (out / "final" / "chat_template.jinja").is_file()  # evaluation renders as training did


def test_token_budget_on_seq2seq_matches_example_batches(smoke_assets, tmp_path):
    """T5: rows x (longest source + longest target) per micro-batch, 1 rank vs 2 (ZeRO-2)."""
    common = {
        "model.name_or_path": smoke_assets["tiny_t5"],
        "model.dropout": 0.0,
        "data.train_file": smoke_assets["train"],
        "data.eval_file": smoke_assets["validation"],
        "data.max_eval_examples": 16,
        "data.max_target_length": 64,
        "train.max_steps": STEPS,
        "train.global_batch_size": 16,
        "train.learning_rate": 1e-3,
        "train.log_every_steps": 1,
    }
    outputs = {}
    for name, launch, nproc, extra in (
        ("examples", None, 1, {"train.micro_batch_size": 4}),
        ("budget", "zero2", 2, {"train.micro_batch_tokens": 2000}),
    ):
        outputs[name] = tmp_path / name
        args = [f"--{k}={v}" for k, v in {**common, **extra, "output_dir": outputs[name]}.items()]
        result = run(launch_command("recipes/finetune.py", args, launch=launch, nproc=nproc))
        assert result.returncode == 0, describe(result)
    expected, actual = train_losses(outputs["examples"]), train_losses(outputs["budget"])
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in expected:
        assert abs(actual[step] - expected[step]) <= RELATIVE * expected[step], step
