"""Automatic micro-batch sizing: exact search, worst-case shapes, agreement, DeepSpeed, cache."""

from __future__ import annotations

import json
import math

import pytest
from helpers import describe, launch_command, recipe_env, run

from clustertune.autobatch import choose_micro_batch, search_largest
from clustertune.errors import UserError


@pytest.mark.parametrize("limit", [1, 3, 8, 16, 33])
def test_search_finds_exactly_the_largest_fitting_size(limit):
    for threshold in range(0, 40):
        largest, probed = search_largest(lambda m, t=threshold: m <= t, limit)
        assert largest == min(threshold, limit)
        assert len(probed) == len(set(probed)) <= 2 * max(1, limit).bit_length() + 1


def test_choice_keeps_the_global_batch_and_says_so():
    assert choose_micro_batch(8, 64, 2, margin=0.0) == (8, "")
    chosen, note = choose_micro_batch(
        10, 64, 2, margin=0.1
    )  # 9 fits but 64/2 = 32 is not a multiple of 9
    assert chosen == 8 and "does not divide" in note
    assert choose_micro_batch(3, 8, 2, margin=0.0)[0] == 2
    with pytest.raises(UserError, match="not even micro_batch_size=1 fits"):
        choose_micro_batch(0, 8, 2, margin=0.0)


def auto_args(assets, out, **overrides):
    values = {
        "model.name_or_path": assets["tiny_t5"],
        "data.train_file": assets["train"],
        "output_dir": out,
        "train.max_steps": 3,
        "train.global_batch_size": 8,
        "train.micro_batch_size": "auto",
        "train.auto_batch_margin": 0.0,
        "train.log_every_steps": 1,
        "peft.method": "lora",
        "model.dropout": 0.0,
        "data.max_target_length": 64,
    }
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def auto_record(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "auto_batch"), [
        r for r in records if "loss" in r
    ]


def test_single_process_probes_worst_case_shapes(smoke_assets, tmp_path):
    from transformers import AutoTokenizer

    from clustertune.config import SEED_PROMPT
    from clustertune.data import TokenizeSpec, load_split, tokenize_dataset

    out = tmp_path / "single"
    result = run(
        launch_command("recipes/finetune.py", auto_args(smoke_assets, out)),
        env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE="5"),
    )
    assert result.returncode == 0, describe(result)
    record, losses = auto_record(out)
    assert (
        record["largest_fitting"] == 5 and record["chosen"] == 4 and record["grad_accum_steps"] == 2
    )
    tokenized = tokenize_dataset(
        load_split(
            str(smoke_assets["train"]),
            split="train",
            required_columns=["dialogue", "summary"],
            what="t",
        ),
        AutoTokenizer.from_pretrained(smoke_assets["tiny_t5"]),
        TokenizeSpec("seq2seq", SEED_PROMPT, "summary", 512, 64),
    )
    longest_source, longest_target = (
        max(tokenized["num_source_tokens"]),
        max(tokenized["num_target_tokens"]),
    )
    assert record["worst_case_shape"] == {
        "source_tokens": longest_source,
        "target_tokens": longest_target,
    }
    for probe in record["probes"]:
        if probe["fits"]:
            assert probe["input_shape"] == [probe["micro_batch_size"], longest_source]
            assert probe["labels_shape"] == [probe["micro_batch_size"], longest_target]
    assert [p["micro_batch_size"] for p in record["probes"]] == [1, 2, 4, 8, 6, 5]
    assert len(losses) == 3


@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["zero2", "zero3"])
def test_two_ranks_agree_on_the_smaller_size_under_deepspeed(launch, smoke_assets, tmp_path):
    out = tmp_path / launch
    command = launch_command(
        "recipes/finetune.py", auto_args(smoke_assets, out), launch=launch, nproc=2
    )
    # rank 0 could take 4 per micro-batch, rank 1 only 2: both must use 2
    result = run(command, env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE="4,2"))
    assert result.returncode == 0, describe(result)
    record, losses = auto_record(out)
    assert record["largest_fitting"] == 2 and record["chosen"] == 2
    assert record["grad_accum_steps"] == 2  # 8 = 2 per micro-batch x 2 accumulation x 2 ranks
    assert not record["cached"], record
    # every optimizer step 1..3 logged a finite loss with the agreed size
    steps = [r["step"] for r in losses]
    assert steps == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in losses), (
        f"expected one finite train loss for each of steps 1..3, got {losses}"
    )
    assert (
        f"ZeRO-{launch[-1]}" in result.stdout
        and "grad_accum_steps 2 for global_batch_size 8" in result.stdout
    )
    if launch == "zero2":
        # a restart with the same output_dir and memory settings reads the cache instead of
        # searching (extending a finished run is a settings change: allow_config_change)
        again = run(
            launch_command(
                "recipes/finetune.py",
                auto_args(
                    smoke_assets, out, **{"train.max_steps": 4, "allow_config_change": "true"}
                ),
                launch=launch,
                nproc=2,
            ),
            env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE="4,2"),
        )
        assert again.returncode == 0, describe(again)
        record, _ = auto_record(out)
        assert record["cached"] and record["chosen"] == 2 and "from cache" in again.stdout
