"""The agent smoke for real: a packed LoRA run on 2 ZeRO-2 ranks over the generated
tool-calling and reasoning conversations (the tiny Llama with Qwen3's template, trained
through TRL's marked copy), then its evaluation on 1 process and on 2 ZeRO-3 ranks:
byte-identical predictions, the same rouge.json with tool-call exact match (multiproc tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import describe, launch_command, run, train_losses

pytestmark = pytest.mark.multiproc

CONFIG = "recipes/configs/smoke/agent_lora.yaml"
EVAL_CONFIG = "recipes/configs/smoke/agent_evaluate.yaml"
NUM_EXAMPLES = 24  # the first 24 of agent_test: 8 end with a tool call, some parallel


@pytest.fixture(scope="module")
def agent_run(smoke_assets, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("agent") / "run"
    args = [
        "--config",
        CONFIG,
        f"--output_dir={output_dir}",
        "--train.max_steps=6",
        "--train.eval_every_steps=0",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
        "--data.max_eval_examples=16",
    ]
    result = run(launch_command("recipes/finetune.py", args, launch="zero2", nproc=2))
    assert result.returncode == 0, describe(result)
    assert "trained through TRL's training copy qwen3_training" in result.stdout, describe(result)
    return output_dir


def evaluate(run_dir: Path, out: Path, launch: str | None) -> tuple[str, dict]:
    args = [
        "--config",
        EVAL_CONFIG,
        f"--run_dir={run_dir}",
        f"--output_dir={out}",
        f"--data.max_examples={NUM_EXAMPLES}",
        "--batch_size=8",
        "--generation.max_new_tokens=24",
        "--num_bootstrap=100",
    ]
    result = run(
        launch_command("recipes/evaluate.py", args, launch=launch, nproc=2 if launch else 1)
    )
    assert result.returncode == 0, describe(result)
    return (out / "predictions.jsonl").read_text(), json.loads((out / "rouge.json").read_text())


def test_packed_zero2_agent_run_and_its_evaluation_on_1_and_2_ranks(agent_run, smoke_assets):
    losses = train_losses(agent_run)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    marker = json.loads((agent_run / "final" / "clustertune_final.json").read_text())
    assert marker["fingerprint"]["chat.mask"] == "generation markers"
    assert "qwen3_training" in marker["fingerprint"]["chat.template"]
    # final/ keeps the family's own (inference) template for deployment
    saved = (agent_run / "final" / "chat_template.jinja").read_text()
    assert saved == (Path(smoke_assets["tiny_qwen3"]) / "chat_template.jinja").read_text()

    single, report = evaluate(agent_run, agent_run.parent / "eval-1", None)
    double, distributed = evaluate(agent_run, agent_run.parent / "eval-2", "zero3")
    assert double == single  # byte for byte
    report.pop("throughput"), distributed.pop("throughput")
    assert distributed == report
    rows = [json.loads(line) for line in single.splitlines()]
    references = [
        json.loads(line)
        for line in Path(smoke_assets["agent_test"]).read_text().splitlines()[:NUM_EXAMPLES]
    ]
    calls = [row for row in references if row["messages"][-1].get("tool_calls")]
    assert report["tool_calls"]["examples"] == len(calls) > 0
    assert 0 <= report["tool_calls"]["exact_match"] <= 100
    for row, reference in zip(rows, references, strict=True):
        assert row["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert ("tool_calls" in row) == bool(reference["messages"][-1].get("tool_calls"))
        assert "text" in row["reply"] and "content" in row["reply"]
    assert report["dataset"]["template_mask"] == "generation markers"
