"""The evaluation recipe for real: 1 plain process vs 2 processes (DDP and ZeRO-3) over gloo
give identical predictions and scores, for a LoRA adapter and a full fine-tune that the
training recipe produced. 19 examples in batches of 4 = 5 batches: not a multiple of
world x batch, so under ZeRO-3 rank 1 runs a repeated padding batch whose outputs must vanish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import describe, launch_command, recipe_env, run

pytestmark = pytest.mark.multiproc

NUM_EXAMPLES, BATCH_SIZE, MAX_NEW_TOKENS = 19, 4, 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


def train(assets, output_dir: Path, peft: str) -> Path:
    """5 optimizer steps on one process: enough to move the weights away from the base."""
    values = {
        "model.name_or_path": assets["tiny_t5"],
        "model.dropout": 0.0,
        "data.train_file": assets["train"],
        "data.max_target_length": 64,
        "output_dir": output_dir,
        "peft.method": peft,
        "train.max_steps": 5,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.learning_rate": 3e-3 if peft == "lora" else 1e-3,
        "train.log_every_steps": 5,
    }
    result = run(launch_command("recipes/finetune.py", [f"--{k}={v}" for k, v in values.items()]))
    assert result.returncode == 0, describe(result)
    return output_dir


@pytest.fixture(scope="module")
def runs(smoke_assets, workdir) -> dict[str, Path]:
    return {peft: train(smoke_assets, workdir / f"train-{peft}", peft) for peft in ("lora", "none")}


_EVALS: dict[tuple[str, str | None], Path] = {}


def eval_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    """The smoke evaluation of a training run on NUM_EXAMPLES examples, plus `extra`."""
    return [
        "--config",
        "recipes/configs/smoke/evaluate.yaml",
        f"--run_dir={run_dir}",
        f"--output_dir={out}",
        f"--data.max_examples={NUM_EXAMPLES}",
        f"--generation.max_new_tokens={MAX_NEW_TOKENS}",
        "--num_bootstrap=200",
        *extra,
    ]


def evaluate(run_dir: Path, launch: str | None, workdir: Path) -> Path:
    key = (run_dir.name, launch)
    if key not in _EVALS:
        out = workdir / f"eval-{run_dir.name}-{launch or 'single'}"
        args = eval_args(run_dir, out, f"--batch_size={BATCH_SIZE}")
        result = run(
            launch_command("recipes/evaluate.py", args, launch=launch, nproc=2 if launch else 1)
        )
        assert result.returncode == 0, describe(result)
        assert (
            "best_reference" in result.stdout
        )  # the console table, printed once by the main process
        assert result.stdout.count("ROUGE F x100") == 1, describe(result)
        _EVALS[key] = out
    return _EVALS[key]


def outputs(eval_dir: Path) -> tuple[list[dict], dict]:
    predictions = [
        json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()
    ]
    return predictions, json.loads((eval_dir / "rouge.json").read_text())


def assert_identical(eval_dir: Path, reference_dir: Path) -> None:
    predictions, report = outputs(eval_dir)
    expected_predictions, expected = outputs(reference_dir)
    assert predictions == expected_predictions  # ids, prompts, predictions, references, scores
    for key in (
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "num_examples",
        "protocols",
        "confidence_intervals",
    ):
        assert report[key] == expected[key], key


@pytest.mark.parametrize("launch", ["ddp", "zero3"])
def test_lora_adapter_same_on_1_and_2_ranks(launch, runs, workdir):
    single = evaluate(runs["lora"], None, workdir)
    assert_identical(evaluate(runs["lora"], launch, workdir), single)
    predictions, report = outputs(single)
    assert [p["id"] for p in predictions] == [
        f"test_{i}" for i in range(NUM_EXAMPLES)
    ]  # dataset order, no repeats
    assert report["num_examples"] == NUM_EXAMPLES and report["model"]["adapter_path"] == str(
        runs["lora"] / "final"
    )
    assert all(
        len(p["references"]) == 3 and len(p["scores"]["per_reference"]) == 3 for p in predictions
    )
    _, distributed = outputs(evaluate(runs["lora"], launch, workdir))
    throughput = distributed["throughput"]
    assert throughput["world_size"] == 2 and throughput["examples_per_second"] > 0
    # 5 batches on 2 ranks: ZeRO-3 runs 3 generate calls on both (one padding); DDP 3 and 2.
    if launch == "zero3":
        assert throughput["strategy"] == "ZeRO-3" and throughput["generate_calls_per_rank"] == 3


def test_full_finetune_same_on_1_rank_and_zero3(runs, workdir):
    single = evaluate(runs["none"], None, workdir)
    assert_identical(evaluate(runs["none"], "zero3", workdir), single)
    _, report = outputs(single)
    assert (
        report["model"]["name_or_path"] == str(runs["none"] / "final")
        and report["model"]["adapter_path"] is None
    )


def test_predictions_match_plain_transformers_generate(runs, workdir, smoke_assets):
    """Independent check of batching, padding and decoding: the 4 longest prompts (the
    recipe's first batch) through PeftModel + generate, as a user would write it."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    predictions, _ = outputs(evaluate(runs["lora"], None, workdir))
    tokenizer = AutoTokenizer.from_pretrained(smoke_assets["tiny_t5"])
    longest = sorted(predictions, key=lambda p: -len(tokenizer(p["prompt"])["input_ids"]))[
        :BATCH_SIZE
    ]
    base = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
    model = PeftModel.from_pretrained(base, str(runs["lora"] / "final")).eval()
    inputs = tokenizer([p["prompt"] for p in longest], return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
    texts = [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
    assert texts == [p["prediction"] for p in longest]


def auto_batch_eval(run_dir: Path, out: Path, launch: str | None, oom_above: str):
    """Evaluation with batch_size: auto under an injected per-rank memory limit."""
    args = eval_args(run_dir, out, "--batch_size=auto", "--auto_batch_margin=0")
    command = launch_command("recipes/evaluate.py", args, launch=launch, nproc=2 if launch else 1)
    result = run(command, env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE=oom_above))
    assert result.returncode == 0, describe(result)
    return result, outputs(out)[1]


def test_auto_batch_probes_the_longest_prompt_and_reuses_the_cache(runs, workdir, smoke_assets):
    from transformers import AutoTokenizer

    out = workdir / "eval-auto-single"
    result, report = auto_batch_eval(runs["lora"], out, None, oom_above="5")
    record = report["auto_batch"]
    assert record["largest_fitting"] == 5 and record["chosen"] == 5 and not record["cached"]
    assert [p["micro_batch_size"] for p in record["probes"]] == [1, 2, 4, 8, 6, 5]
    # the worst case: copies of the longest prompt, forced to generate every allowed token
    predictions, _ = outputs(out)
    tokenizer = AutoTokenizer.from_pretrained(smoke_assets["tiny_t5"])
    longest = max(len(tokenizer(p["prompt"])["input_ids"]) for p in predictions)
    assert record["worst_case_shape"] == {
        "prompt_tokens": longest,
        "new_tokens": MAX_NEW_TOKENS,
        "num_beams": 1,
    }
    for probe in record["probes"]:
        n = probe["micro_batch_size"]
        if probe["fits"]:
            assert probe["input_shape"] == [n, longest]
            assert probe["output_shape"] == [n, 1 + MAX_NEW_TOKENS]  # decoder start + new tokens
        else:
            assert n > 5 and probe["failed_at"] == "allocate batch"
    assert report["throughput"]["batch_size"] == 5
    assert "auto batch_size: largest fitting 5, chosen 5" in result.stdout
    # the same command again: the cached result, no search
    again, report = auto_batch_eval(runs["lora"], out, None, oom_above="5")
    assert report["auto_batch"]["cached"] and report["auto_batch"]["chosen"] == 5
    assert "from cache" in again.stdout


def test_auto_batch_agreed_by_2_zero3_ranks_matches_the_fixed_batch(runs, workdir):
    """Rank 0 could take 6 prompts, rank 1 only 4: both use 4, and the predictions and
    scores are those of the 1-process run with batch_size=4."""
    result, report = auto_batch_eval(
        runs["lora"], workdir / "eval-auto-zero3", "zero3", oom_above="6,4"
    )
    record = report["auto_batch"]
    assert record["largest_fitting"] == 4 and record["chosen"] == 4
    assert [p["micro_batch_size"] for p in record["probes"]] == [1, 2, 4, 8, 6, 5]
    assert (
        report["throughput"]["strategy"] == "ZeRO-3"
        and report["throughput"]["batch_size"] == BATCH_SIZE
    )
    assert_identical(workdir / "eval-auto-zero3", evaluate(runs["lora"], None, workdir))
