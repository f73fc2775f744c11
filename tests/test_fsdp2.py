"""FSDP2 for real: torch's fully_shard over gloo on 2 CPU processes, through the shipped launch
files (multiproc tier).

- exactness: 2 ranks x micro 1 x accumulation 2 under FSDP2 give the losses and final eval
  loss of 1 process x micro 4 (fp32, rel 1e-5), T5 fully fine-tuned (with the launch file's
  activation checkpointing) and a Llama with LoRA, packed; final/ loads with peft and gives the run's own final eval loss;
- checkpoints (torch.distributed.checkpoint): kill -9 after a checkpoint and the same
  command again; resume 2 -> 1 and 1 -> 2 ranks; all equal to the uninterrupted run;
  clustertune-checkpoint consolidate on an FSDP2 checkpoint;
- auto batch size on 2 ranks; evaluation on 2 FSDP2 ranks byte-identical to 1 process;
- launch files that contradict the config or that FSDP2 cannot run: one line each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    REPO,
    describe,
    kill_tree,
    launch_command,
    recipe_env,
    run,
    train_losses,
    wait_for_step,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.multiproc

CHECKPOINT_CLI = str(Path(sys.executable).parent / "clustertune-checkpoint")

RELATIVE = 1e-5  # fp32 on CPU: measured 1e-8 to 2e-7


def common(config: str, out: Path, **overrides) -> list[str]:
    values = {
        "output_dir": out,
        "train.max_steps": 4,
        "train.global_batch_size": 4,
        "train.log_every_steps": 1,
        "train.eval_every_steps": 0,
        "checkpoint.every_steps": 0,
        "data.max_eval_examples": 16,
        "model.dropout": 0.0,
        "peft.dropout": 0.0,
    }
    values.update(overrides)
    return ["--config", f"recipes/configs/smoke/{config}.yaml"] + [
        f"--{k}={v}" for k, v in values.items()
    ]


def final_eval_loss(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in records if r.get("final"))


def assert_same(losses: dict[int, float], reference: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(losses[step] - reference[step]) <= RELATIVE * abs(reference[step]), (
            step,
            losses[step],
            reference[step],
        )


@pytest.mark.parametrize("config", ["full", "chat_lora"], ids=["t5-full", "llama-lora-packed"])
def test_fsdp2_on_2_ranks_equals_one_process(config, smoke_assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = run(
        launch_command("recipes/finetune.py", common(config, one, **{"train.micro_batch_size": 4}))
    )
    assert result.returncode == 0, describe(result)
    launch = "fsdp2"
    if config == "full":
        # the launch file's activation checkpointing: the same losses; rank-0 loading: a note
        text = (REPO / "launch" / "fsdp2.yaml").read_text()
        launch = str(tmp_path / "fsdp2_checkpointing")
        for key in ("fsdp_activation_checkpointing", "fsdp_cpu_ram_efficient_loading"):
            assert f"{key}: false" in text
            text = text.replace(f"{key}: false", f"{key}: true")
        Path(f"{launch}.yaml").write_text(text)
    result = run(
        launch_command(
            "recipes/finetune.py",
            common(config, two, **{"train.micro_batch_size": 1}),
            launch=launch,
            nproc=2,
        )
    )
    assert result.returncode == 0, describe(result)
    assert ", FSDP2" in result.stdout
    assert ("gradient checkpointing on" in result.stdout) == (config == "full")
    assert ("fsdp_cpu_ram_efficient_loading: true" in result.stdout) == (config == "full")
    reference = train_losses(one)
    assert_same(train_losses(two), reference, range(1, 5))
    loss = final_eval_loss(two)
    assert abs(loss - final_eval_loss(one)) <= RELATIVE * loss
    if config == "chat_lora":  # final/ is a standard adapter: peft loads it, same eval loss
        assert abs(adapter_eval_loss(two / "final", smoke_assets) - loss) <= RELATIVE * loss


def adapter_eval_loss(final: Path, smoke_assets) -> float:
    """The eval loss of final/ loaded with transformers + peft, over the run's own eval rows
    (the prepared data the run read), computed here without any clustertune model code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.data import Collator
    from clustertune.modeling import load_tokenizer
    from clustertune.prepare import ensure_prepared, load_prepared, open_prepared, plan_sources

    cfg = parse_config(FinetuneConfig, ["--config", str(final.parent / "config.yaml")])
    tokenizer = load_tokenizer(str(final))
    sources = plan_sources(cfg, tokenizer, "causal")
    prepared = open_prepared(cfg, tokenizer, "causal", sources)
    ensure_prepared(prepared, sources, tokenizer)
    rows = load_prepared(prepared, sources, cfg).eval
    base = AutoModelForCausalLM.from_pretrained(smoke_assets["tiny_causal"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(final)).eval()
    collate = Collator(tokenizer.pad_token_id)
    total = tokens = 0.0
    with torch.no_grad():
        for row in rows:
            batch = collate([{"input_ids": row["input_ids"], "labels": row["labels"]}])
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
            ).item()
            tokens += int((labels != -100).sum())
    return total / tokens


def fsdp2(out: Path, nproc: int, **overrides) -> list[str]:
    values = {
        "train.max_steps": 6,
        "train.micro_batch_size": 1,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3,
        **overrides,
    }
    return launch_command(
        "recipes/finetune.py", common("chat_lora", out, **values), launch="fsdp2", nproc=nproc
    )


def zero2(out: Path) -> list[str]:
    """The same run as fsdp2(out, 2), under ZeRO-2."""
    values = {
        "train.max_steps": 6,
        "train.micro_batch_size": 1,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3,
    }
    return launch_command(
        "recipes/finetune.py", common("chat_lora", out, **values), launch="zero2", nproc=2
    )


def resumable_copy(source: Path, dest: Path, step: int) -> Path:
    """The run folder as it was when step_`step` was its newest checkpoint."""
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "final", ignore_errors=True)
    for checkpoint in (dest / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dest


def test_fsdp2_checkpoints_resume_exactly_after_a_kill_and_on_other_world_sizes(tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    result = run(fsdp2(reference_dir, 2))
    assert result.returncode == 0, describe(result)
    reference = train_losses(reference_dir)
    marker = json.loads((reference_dir / "checkpoints/step_2/COMPLETE.json").read_text())
    assert marker["engine"] == "fsdp2" and marker["world_size"] == 2
    assert any(name.startswith("dcp/") and name.endswith(".distcp") for name in marker["files"])

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        fsdp2(killed, 2),
        cwd=REPO,
        env=recipe_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_step(killed, 5, process)  # step_4 is complete once step 5 trains
    kill_tree(process.pid)
    process.wait(timeout=60)
    assert not (killed / "final").exists()
    result = run(fsdp2(killed, 2))
    assert result.returncode == 0, describe(result)
    assert "resumed from" in result.stdout and "step_4" in result.stdout
    assert_same(train_losses(killed), reference, range(1, 7))

    two_to_one = resumable_copy(reference_dir, tmp_path / "two-to-one", 2)
    result = run(fsdp2(two_to_one, 1))
    assert result.returncode == 0, describe(result)
    assert "resharded from 2 to 1 ranks" in result.stdout
    assert_same(train_losses(two_to_one), reference, range(3, 7))

    one_to_two = resumable_copy(two_to_one, tmp_path / "one-to-two", 4)  # step_4: 1 rank's
    result = run(fsdp2(one_to_two, 2))
    assert result.returncode == 0, describe(result)
    assert "resharded from 1 to 2 ranks" in result.stdout
    assert_same(train_losses(one_to_two), reference, range(5, 7))

    # across engines: FSDP2 step_2 -> ZeRO-2 (DeepSpeed's universal form written from DCP),
    # whose step_4 -> FSDP2 on 1 rank (the universal form read into DCP shards)
    to_zero = resumable_copy(reference_dir, tmp_path / "fsdp2-to-zero2", 2)
    result = run(zero2(to_zero))
    assert result.returncode == 0, describe(result)
    assert "this launch is ZeRO-2 on 2: its weights and Adam moments are written" in result.stdout
    assert_same(train_losses(to_zero), reference, range(3, 7))
    assert not list((to_zero / "checkpoints/step_2").glob(".universal.tmp-*"))  # cleaned up
    back = resumable_copy(to_zero, tmp_path / "zero2-to-fsdp2", 4)
    assert (back / "checkpoints/step_4/engine").is_dir()  # a ZeRO-2 checkpoint
    result = run(fsdp2(back, 1))
    assert result.returncode == 0, describe(result)
    assert "read from DeepSpeed's universal form" in result.stdout
    assert_same(train_losses(back), reference, range(5, 7))
    from clustertune.errors import UserError
    from clustertune.reshard import resume_plan

    with pytest.raises(UserError, match="cannot continue under ZeRO-3.*launch/fsdp2.yaml"):
        resume_plan(reference_dir / "checkpoints/step_2", world_size=2, zero_stage=3)

    # step_4 of the 2-rank run and of the 1-rank run that continued it: one model, two
    # shard layouts; consolidated, the same adapter
    adapters = []
    for run_dir in (reference_dir, two_to_one):
        consolidated = tmp_path / f"consolidated-{run_dir.name}"
        result = run(
            [CHECKPOINT_CLI, "consolidate", str(run_dir / "checkpoints/step_4"), str(consolidated)]
        )
        assert result.returncode == 0, describe(result)
        adapters.append(load_file(str(consolidated / "adapter_model.safetensors")))
    assert adapters[0] and set(adapters[0]) == set(adapters[1])
    for name, tensor in adapters[0].items():
        assert adapters[1][name].allclose(tensor, rtol=1e-5, atol=1e-7), name


def test_fsdp2_auto_batch_and_evaluation_on_2_ranks(smoke_assets, tmp_path):
    out = tmp_path / "auto"
    result = run(fsdp2(out, 2, **{"train.max_steps": 2, "train.micro_batch_size": "auto"}))
    assert result.returncode == 0, describe(result)
    assert "auto micro-batch: largest fitting" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    search = next(r for r in records if r.get("event") == "auto_batch")
    assert search["chosen"] >= 1 and search["grad_accum_steps"] * search["chosen"] * 2 == 4
    outputs = {}
    for launch in (None, "fsdp2"):
        folder = tmp_path / f"eval-{launch or 'one'}"
        args = [
            "--config",
            "recipes/configs/smoke/chat_evaluate.yaml",
            f"--run_dir={out}",
            f"--output_dir={folder}",
            "--data.max_examples=11",
            "--batch_size=4",
            "--generation.max_new_tokens=12",
            "--num_bootstrap=50",
        ]
        result = run(
            launch_command("recipes/evaluate.py", args, launch=launch, nproc=2 if launch else 1)
        )
        assert result.returncode == 0, describe(result)
        report = json.loads((folder / "rouge.json").read_text())
        outputs[launch] = ((folder / "predictions.jsonl").read_text(), report)
    assert outputs["fsdp2"][0] == outputs[None][0]  # byte for byte
    assert outputs["fsdp2"][1]["throughput"]["strategy"] == "FSDP2"


BAD_LAUNCHES = [
    ({"FSDP_VERSION": "1"}, "fsdp_config.fsdp_version=1: clustertune runs FSDP2"),
    ({"FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, "fsdp_state_dict_type=FULL_STATE_DICT"),
    ({"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}, "names LlamaDecoderLayer, which 't5'"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision=bf16 contradicts model.dtype=fp32"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
]


@pytest.mark.parametrize(("env", "message"), BAD_LAUNCHES, ids=[m[:24] for _, m in BAD_LAUNCHES])
def test_an_fsdp_launch_file_that_cannot_run_is_one_line(env, message, smoke_assets, tmp_path):
    """The variables accelerate launch exports from a launch file, set as it sets them."""
    fsdp = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        **env,
    }
    out = tmp_path / "out"
    args = common("full", out, **{"train.micro_batch_size": 4})
    result = run(launch_command("recipes/finetune.py", args), env=recipe_env(**fsdp))
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() or not any(out.iterdir())  # before compute: nothing written
