"""A finished run is never lost: refusals before compute that leave every file of the run as it
was, and the one allowed change (allow_config_change=true) that says what it does.

One tiny LoRA run (4 steps, a checkpoint at step 2) is trained once through the real recipe;
each test works on its own copy. Refusals run the recipes' main() in this process (fast); runs
that train are real processes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, describe, load_recipe, run

from clustertune.evaluation import EvaluateConfig
from clustertune.evaluation.config import EvalDataConfig, resolve_config

PROMPT = "Chat {dialogue} TLDR"  # not the default: evaluation must find it in the run
LEARNING_RATE = 1e-3


def train_args(smoke_assets, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--output_dir={out}",
        f"--data.prompt_template={PROMPT}",
        "--data.max_source_length=100",
        "--data.max_target_length=32",
        "--model.dropout=0.0",
        "--peft.method=lora",
        "--peft.r=4",
        "--train.max_steps=4",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=4",
        f"--train.learning_rate={LEARNING_RATE}",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=2",
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, by relative path: the run is untouched iff this is equal."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def in_process(recipe: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a recipe's main() run in this process."""
    module = load_recipe(recipe)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", *args])
    try:
        code = module.main()
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("clustertune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(smoke_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run_a"
    result = run(
        [sys.executable, str(REPO / "recipes" / "finetune.py"), *train_args(smoke_assets, out)]
    )
    assert result.returncode == 0, describe(result)
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "checkpoints" / "step_2").is_dir()
    return out


@pytest.fixture
def run_a(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run_a"
    shutil.copytree(finished_run, copy)
    return copy


def eval_config(run_dir: Path, smoke_assets) -> EvaluateConfig:
    return EvaluateConfig(
        run_dir=str(run_dir),
        output_dir=str(run_dir / "eval"),
        data=EvalDataConfig(eval_file=str(smoke_assets["test"])),
    )


def metrics(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


# ------------------------------------------------------------ 1. evaluation into a training run


def test_evaluating_into_the_run_folder_is_refused_and_leaves_it_untouched(
    run_a, smoke_assets, capsys, monkeypatch
):
    before = snapshot(run_a)
    code, _, err = in_process(
        "evaluate",
        [
            f"--run_dir={run_a}",
            f"--output_dir={run_a}",
            f"--data.eval_file={smoke_assets['test']}",
            "--data.reference_columns=[no_such_column]",  # the case: a failing eval
        ],
        capsys,
        monkeypatch,
    )
    line = one_error_line(err)
    assert code == 2 and f"output_dir '{run_a}' holds a training run's files" in line, line
    assert f"--output_dir={run_a / 'eval'}" in line
    assert snapshot(run_a) == before


@pytest.mark.parametrize("holds", ["config.yaml", "final/", "checkpoints/", "metrics.jsonl"])
def test_any_sign_of_a_training_run_refuses_the_eval_output_dir(
    holds, finished_run, tmp_path, smoke_assets, capsys, monkeypatch
):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    name = holds.rstrip("/")
    source = finished_run / name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    before = snapshot(folder)
    code, _, err = in_process(
        "evaluate",
        [f"--model.name_or_path={smoke_assets['tiny_t5']}", f"--output_dir={folder}"],
        capsys,
        monkeypatch,
    )
    line = one_error_line(err)
    assert code == 2 and f"holds a training run's files ({holds})," in line, line
    assert snapshot(folder) == before


def test_eval_writes_its_config_only_after_validation(tmp_path, smoke_assets, capsys, monkeypatch):
    out = tmp_path / "eval"
    code, _, err = in_process(
        "evaluate",
        [
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            f"--data.eval_file={smoke_assets['test']}",
            "--data.reference_columns=[no_such_column]",
            f"--output_dir={out}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "no_such_column" in one_error_line(err)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_eval_beside_the_run_in_its_eval_folder_works(run_a, smoke_assets, capsys, monkeypatch):
    before = snapshot(run_a)
    code, out, err = in_process(
        "evaluate",
        [
            f"--run_dir={run_a}",
            f"--output_dir={run_a / 'eval'}",
            f"--data.eval_file={smoke_assets['test']}",
            "--data.reference_columns=[summary1]",
            "--data.max_examples=4",
            "--generation.max_new_tokens=4",
            "--num_bootstrap=10",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert (run_a / "eval" / "rouge.json").is_file() and (run_a / "eval" / "config.yaml").is_file()
    after = {k: v for k, v in snapshot(run_a).items() if not k.startswith("eval/")}
    assert after == before


# ------------------------------------------------------------ 2. a finished run with other settings


@pytest.mark.parametrize(
    "change, named",
    [
        ("--peft.method=none", "peft.method: 'lora' -> 'none'"),
        ("--train.learning_rate=0.5", f"train.learning_rate: {LEARNING_RATE} -> 0.5"),
    ],
)
def test_a_finished_run_rerun_with_other_settings_names_them(
    run_a, smoke_assets, capsys, monkeypatch, change, named
):
    before = snapshot(run_a)
    args = train_args(smoke_assets, run_a, change)
    code, _, err = in_process("finetune", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "holds a finished run that was made with other settings" in line, line
    assert named in line and "use a new output_dir" in line
    if change.startswith("--peft"):
        # Its checkpoint holds LoRA parameters: not even allow_config_change can continue it.
        assert "cannot be resumed" in line
    assert snapshot(run_a) == before


def test_other_settings_name_the_keys_and_what_allow_config_change_does(
    run_a, smoke_assets, capsys, monkeypatch
):
    shutil.rmtree(run_a / "checkpoints")  # the default (checkpoint.every_steps=0) keeps none
    before = snapshot(run_a)
    args = train_args(smoke_assets, run_a, "--peft.method=none", "--checkpoint.every_steps=0")
    code, _, err = in_process("finetune", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "holds a finished run that was made with other settings" in line, line
    assert "peft.method: 'lora' -> 'none'" in line and "use a new output_dir" in line
    assert (
        "allow_config_change=true, which trains from step 0" in line and "replaces final/" in line
    )
    assert snapshot(run_a) == before


def test_same_settings_are_already_finished_and_keep_every_file(
    run_a, smoke_assets, capsys, monkeypatch
):
    before = snapshot(run_a)
    # how often it logs is not part of the identity: still the same finished run, config.yaml kept
    args = train_args(smoke_assets, run_a, "--train.log_every_steps=2")
    code, out, err = in_process("finetune", args, capsys, monkeypatch)
    assert code == 0 and "already finished at step 4" in out, (out, err)
    assert snapshot(run_a) == before


def test_allow_config_change_replaces_the_finished_run_and_says_so(run_a, smoke_assets):
    shutil.rmtree(run_a / "checkpoints")
    args = train_args(
        smoke_assets,
        run_a,
        "--peft.method=none",
        "--checkpoint.every_steps=0",
        "--allow_config_change=true",
    )
    result = run([sys.executable, str(REPO / "recipes" / "finetune.py"), *args])
    assert result.returncode == 0, describe(result)
    assert "allow_config_change=true: the finished run in" in result.stdout, describe(result)
    assert "trains from step 0 with the new settings" in result.stdout
    final = run_a / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    assert json.loads((final / "clustertune_final.json").read_text())["peft_method"] == "none"


# ------------------------------------------------------------ 3. a failed rerun keeps config.yaml


def test_failed_rerun_keeps_config_yaml_and_eval_prompts_as_trained(
    run_a, smoke_assets, capsys, monkeypatch
):
    before = snapshot(run_a)
    for extra in (
        ["--data.prompt_template=TL;DR of {dialogue}", "--peft.r=0"],
        ["--data.prompt_template=TL;DR of {dialogue}"],
    ):
        code, _, err = in_process(
            "finetune", train_args(smoke_assets, run_a, *extra), capsys, monkeypatch
        )
        line = one_error_line(err)
        assert code == 2, line
        assert snapshot(run_a) == before
    assert "data.prompt_template: 'Chat {dialogue} TLDR' -> 'TL;DR of {dialogue}'" in line
    resolved, _ = resolve_config(eval_config(run_a, smoke_assets))
    assert (resolved.data.prompt_template, resolved.data.max_source_length) == (PROMPT, 100)
    assert resolved.model.name_or_path == str(smoke_assets["tiny_t5"])


def test_eval_takes_prompt_and_truncation_from_final_not_config_yaml(run_a, smoke_assets):
    """config.yaml describes the last launch into the folder (e.g. one that failed under an
    older version); final/ records what its model was trained with."""
    config_file = run_a / "config.yaml"
    config_file.write_text(
        config_file.read_text()
        .replace(PROMPT, "TL;DR of {dialogue}")
        .replace("max_source_length: 100", "max_source_length: 7")
    )
    resolved, _ = resolve_config(eval_config(run_a, smoke_assets))
    assert (resolved.data.prompt_template, resolved.data.max_source_length) == (PROMPT, 100)
    assert resolved.data.source_column == "dialogue"
    marker = json.loads((run_a / "final" / "clustertune_final.json").read_text())
    assert (marker["prompt_template"], marker["max_source_length"], marker["source_column"]) == (
        PROMPT,
        100,
        "dialogue",
    )


# ------------------------------------------------------------ 4. extending a run


def test_extending_a_finished_run_is_refused_by_default(run_a, smoke_assets, capsys, monkeypatch):
    before = snapshot(run_a)
    args = train_args(smoke_assets, run_a, "--train.max_steps=8")
    code, _, err = in_process("finetune", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "train.max_steps: 4 -> 8" in line, line
    assert "allow_config_change=true, which resumes from" in line
    assert "(the LR schedule rebuilt for 8 steps)" in line
    assert snapshot(run_a) == before


def test_changing_the_total_of_a_checkpoint_is_refused(run_a, smoke_assets, capsys, monkeypatch):
    shutil.rmtree(run_a / "final")  # stopped after its step-2 checkpoint
    before = snapshot(run_a)
    args = train_args(smoke_assets, run_a, "--train.max_steps=8")
    code, _, err = in_process("finetune", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "checkpoints/step_2 was made with different settings" in line, line
    assert "train.max_steps: 4 -> 8" in line
    assert snapshot(run_a) == before


def test_extension_with_allow_config_change_follows_the_new_schedule(run_a, smoke_assets):
    args = train_args(smoke_assets, run_a, "--train.max_steps=8", "--allow_config_change=true")
    result = run([sys.executable, str(REPO / "recipes" / "finetune.py"), *args])
    assert result.returncode == 0, describe(result)
    assert "resumed from" in result.stdout and "step_2" in result.stdout, describe(result)
    assert (
        "allow_config_change=true: total steps 4 -> 8; the LR schedule is rebuilt for 8 steps "
        "(warmup 0, linear decay to 0 at step 8): step 3 trains at lr 0.00075" in result.stdout
    ), describe(result)
    records = metrics(run_a)
    assert sorted(records) == list(range(1, 9))
    # lr logged after step s is the one step s+1 uses: the linear decay to 0 at step 8
    for step in range(3, 9):
        assert records[step]["lr"] == pytest.approx(LEARNING_RATE * (1 - step / 8)), step
    assert json.loads((run_a / "final" / "clustertune_final.json").read_text())["step"] == 8


def test_restored_schedule_continues_the_new_one_and_keeps_an_unchanged_one_exact():
    """checkpoint.restore_schedule_position: the optimizer's lr for the next step too."""
    from clustertune.checkpoint import restore_schedule_position
    from clustertune.config import TrainConfig
    from clustertune.optim import build_scheduler

    def schedule(total: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LEARNING_RATE)
        return optimizer, build_scheduler(optimizer, TrainConfig(), total)

    old_optimizer, old = schedule(4)
    for _ in range(2):
        old_optimizer.step()
        old.step()
    for total in (8, 4):
        optimizer, new = schedule(total)
        optimizer.load_state_dict(old_optimizer.state_dict())  # holds the old schedule's lr
        restore_schedule_position(new, old.state_dict())
        expected = LEARNING_RATE * (1 - 2 / total)
        assert optimizer.param_groups[0]["lr"] == expected and new.last_epoch == 2
        optimizer.step()
        new.step()
        assert new.get_last_lr()[0] == pytest.approx(LEARNING_RATE * (1 - 3 / total))


# ------------------------------------------------------------ 8. resume= an incomplete folder


def test_resume_from_a_folder_with_only_the_marker_names_what_is_missing(
    tmp_path, smoke_assets, capsys, monkeypatch
):
    fake = tmp_path / "step_9"
    fake.mkdir()
    (fake / "COMPLETE.json").write_text('{"step": 9, "world_size": 1}')
    out = tmp_path / "new_run"
    args = train_args(smoke_assets, out, f"--resume={fake}")
    code, _, err = in_process("finetune", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and f"the checkpoint in {fake} is incomplete" in line, line
    for name in ("trainer_state.json", "trainable_parameters.safetensors", "optimizer.pt"):
        assert name in line
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------ 9. no tool writes into a run


def checkpoint_tool(args: list[str], capsys) -> tuple[int, str, str]:
    from clustertune.checkpoint_cli import main

    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "inside, where",
    [
        ("checkpoints/step_2/export", "inside the checkpoint"),
        ("checkpoints/step_8", "inside the checkpoint"),  # a step the run will save
        ("checkpoints/exported", "the checkpoints/ of the training run"),
        ("final/step_2_model", "the final/ of the training run"),
    ],
)
@pytest.mark.parametrize("command", ["consolidate", "convert"])
def test_checkpoint_tools_refuse_a_destination_inside_a_run(run_a, command, inside, where, capsys):
    before = snapshot(run_a)
    dest = run_a / inside
    code, _, err = checkpoint_tool(
        [command, str(run_a / "checkpoints" / "step_2"), str(dest)], capsys
    )
    line = one_error_line(err)
    assert code == 2 and f"destination '{dest}' is" in line and where in line, line
    assert "which the run prunes or replaces" in line
    assert snapshot(run_a) == before


def test_consolidate_beside_the_run_works_and_a_damaged_checkpoint_is_refused(
    run_a, tmp_path, capsys
):
    step_2 = run_a / "checkpoints" / "step_2"
    dest = tmp_path / "step_2_adapter"
    code, out, err = checkpoint_tool(["consolidate", str(step_2), str(dest)], capsys)
    assert code == 0 and (dest / "adapter_config.json").is_file(), err
    optimizer = step_2 / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, _, err = checkpoint_tool(["consolidate", str(step_2), str(tmp_path / "again")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"the checkpoint in {step_2} is damaged (optimizer.pt has 100" in line
    assert not (tmp_path / "again").exists()


def test_compare_out_refuses_a_run_and_an_evaluation_unless_overwrite(
    run_a, tmp_path, capsys, monkeypatch
):
    from test_compare_paired import STRONG, WEAK, make_eval

    first, second = make_eval(tmp_path / "a", WEAK), make_eval(tmp_path / "b", STRONG)
    run_before, eval_before = snapshot(run_a), snapshot(first)
    for out, expected in [
        (run_a, "holds a training run's files (config.yaml, final/, checkpoints/, metrics.jsonl)"),
        (run_a / "final" / "compare", "the final/ of the training run"),
        (run_a / "checkpoints" / "step_2" / "compare", "inside the checkpoint"),
        (first, "holds an evaluation's results (rouge.json, predictions.jsonl)"),
    ]:
        args = ["--compare", str(first), str(second), "--out", str(out)]
        code, _, err = in_process("evaluate", args, capsys, monkeypatch)
        line = one_error_line(err)
        assert code == 2 and f"--out '{out}' " in line and expected in line, line
    assert snapshot(run_a) == run_before and snapshot(first) == eval_before
    args = ["--compare", str(first), str(second), "--out", str(first), "--overwrite"]
    code, _, err = in_process("evaluate", args, capsys, monkeypatch)
    assert code == 0 and (first / "comparison.md").is_file(), err
    assert {k: v for k, v in snapshot(first).items() if "comparison" not in k} == eval_before


def test_an_evaluation_folder_is_reused_only_with_its_settings_or_overwrite(
    run_a, smoke_assets, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "eval"

    def evaluate(*extra: str) -> tuple[int, str, str]:
        args = [
            f"--run_dir={run_a}",
            f"--output_dir={out}",
            f"--data.eval_file={smoke_assets['test']}",
            "--data.reference_columns=[summary1]",
            "--data.max_examples=4",
            "--num_bootstrap=10",
            *extra,
        ]
        return in_process("evaluate", args, capsys, monkeypatch)

    code, _, err = evaluate("--generation.max_new_tokens=4")
    assert code == 0, err
    before = snapshot(out)
    code, _, err = evaluate("--generation.max_new_tokens=5")
    line = one_error_line(err)
    assert code == 2 and "holds the results of an evaluation made with other settings" in line
    assert "generation.max_new_tokens: 4 -> 5" in line and "overwrite=true" in line, line
    assert snapshot(out) == before
    code, _, err = evaluate("--generation.max_new_tokens=4")  # the same settings: a rerun
    assert code == 0, err
    code, _, err = evaluate("--generation.max_new_tokens=5", "--overwrite=true")
    assert code == 0, err
    assert json.loads((out / "rouge.json").read_text())["generation"]["max_new_tokens"] == 5


def test_evaluation_inside_a_runs_final_is_refused(run_a, smoke_assets, capsys, monkeypatch):
    before = snapshot(run_a)
    out = run_a / "final" / "eval"
    args = [f"--run_dir={run_a}", f"--output_dir={out}", f"--data.eval_file={smoke_assets['test']}"]
    code, _, err = in_process("evaluate", args, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and f"output_dir '{out}' is inside" in line, line
    assert "which the run prunes or replaces" in line
    assert snapshot(run_a) == before
