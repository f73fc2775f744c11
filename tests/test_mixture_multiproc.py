"""A weighted mixture for real: two sources (tool-calling and plain chat conversations, each
with its eval split) on 2 DDP ranks, which prepare the data themselves (one waits on the
other's file lock), then on 1 process from the prepared set: the same mixture, the same
losses step for step, and an eval loss per source (multiproc tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import describe, launch_command, run, train_losses

pytestmark = pytest.mark.multiproc


def mixture_args(smoke_assets, output_dir: Path, prepared: Path) -> list[str]:
    mixture = [
        {
            "name": "agent",
            "train_file": str(smoke_assets["agent_train"]),
            "eval_file": str(smoke_assets["agent_validation"]),
            "weight": 3,
        },
        {
            "name": "chat",
            "train_file": str(smoke_assets["chat_train"]),
            "eval_file": str(smoke_assets["chat_validation"]),
            "weight": 1,
        },
    ]
    return [
        "--config",
        "recipes/configs/smoke/agent_lora.yaml",
        f"--output_dir={output_dir}",
        "--data.train_file=null",
        "--data.eval_file=null",
        f"--data.mixture={json.dumps(mixture)}",
        "--data.mixture_examples=800",
        "--data.max_eval_examples=16",
        f"--data.prepared_dir={prepared}",
        "--train.max_steps=3",
        "--train.log_every_steps=1",
        "--train.eval_every_steps=0",
        "--checkpoint.every_steps=0",
    ]


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_is_the_same_on_1_and_2_ranks(smoke_assets, tmp_path):
    prepared = tmp_path / "prepared"
    two, one = tmp_path / "two", tmp_path / "one"
    result = run(
        launch_command(
            "recipes/finetune.py",
            mixture_args(smoke_assets, two, prepared),
            launch="ddp",
            nproc=2,
        )
    )
    assert result.returncode == 0, describe(result)
    assert result.stdout.count("prepared agent/train shard 1 of 1") == 1  # by one rank
    assert "mixture: agent: 600 examples (0.30 passes over 2,000)" in result.stdout
    assert "mixture: chat: 200 examples" in result.stdout
    result = run(launch_command("recipes/finetune.py", mixture_args(smoke_assets, one, prepared)))
    assert result.returncode == 0, describe(result)
    assert "/train shard" not in result.stdout  # no shard prepared again: nothing tokenised
    a, b = train_losses(two), train_losses(one)
    assert sorted(a) == [1, 2, 3] and sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a[step], b[step])
    mixture = [r for r in records(one) if r.get("event") == "mixture"]
    assert mixture == [r for r in records(two) if r.get("event") == "mixture"]
    shares = {s["name"]: s for s in mixture[0]["sources"]}
    assert shares["agent"]["examples"] == 600 and shares["chat"]["examples"] == 200
    final = [r for r in records(one) if r.get("final")][0]
    assert {"eval_loss", "eval_loss/agent", "eval_loss/chat"} <= set(final)
    low, high = sorted([final["eval_loss/agent"], final["eval_loss/chat"]])
    assert low <= final["eval_loss"] <= high  # the overall loss weighs both sources' tokens
