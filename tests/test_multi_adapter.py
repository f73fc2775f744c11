"""Many LoRA adapters of one base in one job (model.adapter_paths): the refusals (fast), and
one job vs separate jobs giving byte-identical predictions.jsonl on 1 process and on 2 DDP
ranks. The separate jobs use model.adapter_path, which merges the adapter: the one job keeps
the adapters unmerged and switches them, so the comparison also checks that, in fp32,
switching gives the merged model's text. The adapters are made here (random lora_B, seeded),
not trained: each differs from the base and from the other from the first token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import describe, launch_command, run

from clustertune.config import parse_config
from clustertune.errors import UserError
from clustertune.evaluation import EvaluateConfig, resolve_config

NUM_EXAMPLES, BATCH_SIZE, MAX_NEW_TOKENS = 7, 3, 12  # 3 batches: 2 ranks get 2 and 1
NAMES = ("lora_a", "lora_b")


def config(*overrides: str) -> EvaluateConfig:
    return parse_config(EvaluateConfig, list(overrides))


def fake_adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"})
    )
    return folder


def paths(*folders: Path) -> str:
    return f"--model.adapter_paths=[{','.join(str(f) for f in folders)}]"


# ----------------------------------------------------------------------------- refusals


def test_adapter_paths_refused_with_adapter_path_or_run_dir(tmp_path, smoke_assets):
    a = fake_adapter(tmp_path / "a", str(smoke_assets["tiny_t5"]))
    with pytest.raises(UserError, match="model.adapter_path and model.adapter_paths are both set"):
        config(paths(a), f"--model.adapter_path={a}")
    with pytest.raises(UserError, match="run_dir and model.adapter_paths both name the model"):
        config(paths(a), f"--run_dir={tmp_path}")
    with pytest.raises(UserError, match="model.include_base needs model.adapter_paths"):
        config("--model.include_base=true")
    with pytest.raises(UserError, match="adapter_names has 1 names for 2 model.adapter_paths"):
        config(paths(a, a), "--model.adapter_names=[x]")


def test_missing_folder_and_other_base_are_refused_by_name(tmp_path, smoke_assets):
    data = f"--data.eval_file={smoke_assets['test']}"
    a = fake_adapter(tmp_path / "a", str(smoke_assets["tiny_t5"]))
    with pytest.raises(UserError, match=r"model.adapter_paths: '.*nowhere' does not exist"):
        resolve_config(config(paths(a, tmp_path / "nowhere"), data))
    other = fake_adapter(tmp_path / "other", "google/flan-t5-base")
    with pytest.raises(
        UserError,
        match=rf"'{a}' was trained on base '{smoke_assets['tiny_t5']}' but '{other}' on base "
        "'google/flan-t5-base'",
    ):
        resolve_config(config(paths(a, other), data))
    with pytest.raises(UserError, match="the adapters were trained on base '.*', but model.name"):
        resolve_config(config(paths(a), data, "--model.name_or_path=google/flan-t5-base"))


def test_names_default_to_folders_and_must_differ(tmp_path, smoke_assets):
    data = f"--data.eval_file={smoke_assets['test']}"
    base = str(smoke_assets["tiny_t5"])
    run_final = fake_adapter(tmp_path / "run_x" / "final", base)  # a training run's final/
    plain = fake_adapter(tmp_path / "plain", base)
    resolved, _ = resolve_config(config(paths(run_final, plain), data))
    assert resolved.model.adapter_names == ["run_x", "plain"]
    assert resolved.model.name_or_path == base  # unset: the adapters' base
    twin = fake_adapter(tmp_path / "elsewhere" / "plain", base)
    with pytest.raises(UserError, match="'plain' names two systems"):
        resolve_config(config(paths(plain, twin), data))
    with pytest.raises(UserError, match="'base' names two systems .model.include_base"):
        resolve_config(
            config(
                paths(plain, twin),
                data,
                "--model.adapter_names=[base,b]",
                "--model.include_base=true",
            )
        )
    with pytest.raises(UserError, match="'a/b' is not a plain folder name"):
        resolve_config(config(paths(plain, twin), data, "--model.adapter_names=[a/b,c]"))


def test_cli_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path, smoke_assets):
    base = str(smoke_assets["tiny_t5"])
    plain = fake_adapter(tmp_path / "plain", base)
    twin = fake_adapter(tmp_path / "elsewhere" / "plain", base)
    out = tmp_path / "out"
    result = run(
        launch_command(
            "recipes/evaluate.py",
            [
                "--config",
                "recipes/configs/smoke/evaluate.yaml",
                paths(plain, twin),
                f"--output_dir={out}",
            ],
        )
    )
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'plain' names two systems" in lines[0], describe(result)
    assert not out.exists()


# ----------------------------------------------------------------------------- one job vs separate jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi_adapter")


@pytest.fixture(scope="module")
def adapters(smoke_assets, workdir) -> list[Path]:
    """Two LoRA adapters of the smoke T5 whose lora_B is seeded noise (peft starts it at 0)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    folders = []
    for seed, name in enumerate(NAMES, start=1):
        model = get_peft_model(
            AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"]),
            LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4 * seed, target_modules=["q", "v"]),
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        model.save_pretrained(workdir / name)
        folders.append(workdir / name)
    return folders


def evaluate(out: Path, *model_args: str, launch: str | None = None) -> Path:
    args = [
        "--config",
        "recipes/configs/smoke/evaluate.yaml",
        f"--output_dir={out}",
        f"--data.max_examples={NUM_EXAMPLES}",
        f"--generation.max_new_tokens={MAX_NEW_TOKENS}",
        f"--batch_size={BATCH_SIZE}",
        "--num_bootstrap=50",
        *model_args,
    ]
    command = launch_command("recipes/evaluate.py", args, launch=launch, nproc=2 if launch else 1)
    result = run(command)
    assert result.returncode == 0, describe(result)
    return out


@pytest.fixture(scope="module")
def separate(adapters, workdir) -> dict[str, Path]:
    """Today's way: one job per adapter (merged), and one for the base."""
    jobs = {
        name: evaluate(workdir / f"alone-{name}", f"--model.adapter_path={folder}")
        for name, folder in zip(NAMES, adapters, strict=True)
    }
    jobs["base"] = evaluate(workdir / "alone-base")
    return jobs


def one_job(adapters: list[Path], out: Path, launch: str | None = None) -> Path:
    return evaluate(out, paths(*adapters), "--model.include_base=true", launch=launch)


def assert_same_as_separate(job: Path, separate: dict[str, Path]) -> None:
    for name, alone in separate.items():
        assert (job / name / "predictions.jsonl").read_bytes() == (
            alone / "predictions.jsonl"
        ).read_bytes(), name
        reports = [json.loads((d / "rouge.json").read_text()) for d in (job / name, alone)]
        for report in reports:
            report.pop("throughput")  # timings; everything else is what the job alone writes
        assert reports[0] == reports[1], name
    predictions = {
        name: [json.loads(line)["prediction"] for line in (job / name / "predictions.jsonl").open()]
        for name in separate
    }
    assert predictions["lora_a"] != predictions["base"] != predictions["lora_b"]
    assert (job / "comparison.md").is_file() and (job / "comparison.png").is_file()
    header = next(
        line
        for line in (job / "comparison.md").read_text().splitlines()
        if line.startswith("| metric")
    )
    assert [cell.strip() for cell in header.split("|")[2:5]] == ["base", *NAMES]  # base first


def test_one_job_equals_separate_jobs_on_one_process(adapters, separate, workdir):
    job = one_job(adapters, workdir / "one-job")
    assert_same_as_separate(job, separate)
    # each system's folder holds the config that reproduces it alone
    alone = parse_config(EvaluateConfig, ["--config", str(job / "lora_a" / "config.yaml")])
    assert alone.model.adapter_path == str(adapters[0]) and alone.model.adapter_paths is None
    assert alone.output_dir == str(job / "lora_a")


@pytest.mark.multiproc
def test_one_job_on_two_ddp_ranks_equals_separate_jobs(adapters, separate, workdir):
    assert_same_as_separate(one_job(adapters, workdir / "one-job-ddp", launch="ddp"), separate)
