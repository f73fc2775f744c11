"""Bad input to the recipes (issue 12, items 5, 6, 7, 8, 10, 11, 12): refused before compute
with one line naming the input and the fix, exit code 2, no traceback, nothing written.

Every case runs a real recipe entry point in this process (recipes/finetune.py,
recipes/evaluate.py, recipes/compare.py), as a user would call it, on the smoke assets.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, load_recipe

ERROR_PREFIX = "clustertune: error:"


def run_recipe(recipe: str, args: list[str], capsys) -> tuple[int, str, str]:
    """main() of recipes/<recipe>.py in this process; (exit code, stdout, stderr). `recipe`
    may carry the recipe's first argument too ("evaluate --compare")."""
    name, *first = recipe.split()
    module = load_recipe(name)
    if name == "finetune":  # reads sys.argv
        sys.argv = ["finetune.py", *first, *args]
        call = module.main
    else:
        call = lambda: module.main([*first, *args])  # noqa: E731
    try:
        code = call()
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code or 0, captured.out, captured.err


def assert_one_error_line(code: int, err: str, expected: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert code == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], err
    assert "Traceback" not in err, err
    return lines[0]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


GOOD = [{"dialogue": f"#Person1#: hello {i}", "summary": f"greeting {i}"} for i in range(6)]


def with_row(index: int, **values) -> list[dict]:
    """GOOD with row `index` changed (a value None is written as JSON null)."""
    rows = [dict(row) for row in GOOD]
    rows[index].update(values)
    return rows


def without_key(index: int, key: str) -> list[dict]:
    rows = [dict(row) for row in GOOD]
    del rows[index][key]
    return rows


def adapter_folder(t: Path, assets: dict) -> Path:
    folder = t / "lora_final"
    write(
        folder / "adapter_config.json",
        json.dumps({"base_model_name_or_path": str(assets["tiny_t5"]), "peft_type": "LORA"}),
    )
    return folder


def empty_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


Args = Callable[[Path, dict], list[str]]


def train_file(make: Callable[[Path], Path]) -> Args:
    return lambda t, a: [f"--data.train_file={make(t)}"]


# (recipe, extra arguments from (tmp_path, smoke assets), text the error line must contain)
CASES: dict[str, tuple[str, Args, str]] = {
    # ---- item 5: text fields that are not text, training and evaluation data
    "null summary": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", with_row(2, summary=None))),
        "d.jsonl' line 3: 'summary' is null or missing; 1 of 6 rows",
    ),
    "missing summary key": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", without_key(4, "summary"))),
        "line 5: 'summary' is null or missing; 1 of 6 rows",
    ),
    "empty csv cell": (
        "finetune",
        train_file(lambda t: write(t / "d.csv", "dialogue,summary\nhi,a\nyo,\nhey,\n")),
        "d.csv' line 3: 'summary' is null or missing; 2 of 3 rows",
    ),
    "empty target": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", with_row(0, summary="  "))),
        "line 1: 'summary' is empty",
    ),
    "list target": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", with_row(1, summary=["a", "b"]))),
        "line 2: 'summary' holds a list (['a', 'b']), not text",
    ),
    "number target": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", with_row(5, summary=7))),
        "line 6: 'summary' holds a number (7), not text",
    ),
    "null dialogue": (
        "finetune",
        train_file(lambda t: jsonl(t / "d.jsonl", with_row(3, dialogue=None))),
        "line 4: 'dialogue' is null or missing",
    ),
    "null dialogue in eval_file": (
        "finetune",
        lambda t, a: [f"--data.eval_file={jsonl(t / 'e.jsonl', with_row(0, dialogue=None))}"],
        "data.eval_file: ",
    ),
    "eval recipe: null dialogue": (
        "evaluate",
        lambda t, a: [f"--data.eval_file={jsonl(t / 'e.jsonl', with_row(2, dialogue=None))}"],
        "data.eval_file: '",
    ),
    "eval recipe: number as reference": (
        "evaluate",
        lambda t, a: [f"--data.eval_file={jsonl(t / 'e.jsonl', with_row(1, summary=3))}"],
        "line 2: 'summary' holds a number (3), not text",
    ),
    "eval recipe: no reference": (
        "evaluate",
        lambda t, a: [f"--data.eval_file={jsonl(t / 'e.jsonl', with_row(1, summary=''))}"],
        "example '1' has no reference in ['summary'] (line 2 of",
    ),
    # ---- item 6: values out of range
    "max_source_length=0": (
        "finetune",
        lambda t, a: ["--data.max_source_length=0"],
        "data.max_source_length=0 must be at least 1",
    ),
    "max_target_length=-3": (
        "finetune",
        lambda t, a: ["--data.max_target_length=-3"],
        "data.max_target_length=-3 must be at least 1",
    ),
    "auto_batch_margin=1.5": (
        "finetune",
        lambda t, a: ["--train.auto_batch_margin=1.5"],
        "train.auto_batch_margin=1.5 must be in [0, 1)",
    ),
    "every_steps=-1": (
        "finetune",
        lambda t, a: ["--checkpoint.every_steps=-1"],
        "checkpoint.every_steps=-1 must be at least 0",
    ),
    "max_eval_examples=0": (
        "finetune",
        lambda t, a: ["--data.max_eval_examples=0"],
        "data.max_eval_examples=0 leaves an empty eval set",
    ),
    "eval recipe: max_source_length=0": (
        "evaluate",
        lambda t, a: ["--data.max_source_length=0"],
        "data.max_source_length=0 must be at least 1",
    ),
    "eval recipe: auto_batch_margin=1.5": (
        "evaluate",
        lambda t, a: ["--batch_size=auto", "--auto_batch_margin=1.5"],
        "auto_batch_margin=1.5 must be in [0, 1)",
    ),
    "eval recipe: top_p=0": (
        "evaluate",
        lambda t, a: ["--generation.top_p=0"],
        "generation.top_p=0.0 must be in (0, 1]",
    ),
    # ---- item 7: values that failed only after compute had started
    "log_every_steps=0": (
        "finetune",
        lambda t, a: ["--train.log_every_steps=0"],
        "train.log_every_steps=0 must be at least 1",
    ),
    "length_group_size=0": (
        "finetune",
        lambda t, a: ["--data.length_group_size=0"],
        "data.length_group_size=0 must be at least 1",
    ),
    "negative learning rate": (
        "finetune",
        lambda t, a: ["--train.learning_rate=-1e-3"],
        "train.learning_rate=-0.001 must be greater than 0",
    ),
    # ---- item 8: prompt templates, trackers, compare --out
    "stray } in template": (
        "finetune",
        lambda t, a: ["--data.prompt_template=Dialogue: {dialogue} }"],
        "data.prompt_template has a stray '}' at character 22",
    ),
    "stray { in template": (
        "finetune",
        lambda t, a: ["--data.prompt_template=Dialogue {: {dialogue}"],
        "data.prompt_template has a stray '{' at character 10",
    ),
    "positional {} in template": (
        "finetune",
        lambda t, a: ["--data.prompt_template={dialogue} {}"],
        "positional placeholder '{}'",
    ),
    "eval recipe: stray } in template": (
        "evaluate",
        lambda t, a: ["--data.prompt_template={dialogue}}"],
        "data.prompt_template has a stray '}'",
    ),
    "misspelled tracker": (
        "finetune",
        lambda t, a: ["--train.report_to=[tensorbord]"],
        "unknown tracker 'tensorbord'; did you mean 'tensorboard'?",
    ),
    "compare --out a file": (
        "compare",
        lambda t, a: [str(t), "--out", str(write(t / "table.md", "mine"))],
        "table.md' is a file; --out names a folder",
    ),
    "evaluate --compare --out a file": (
        "evaluate --compare",
        lambda t, a: [str(t), "--out", str(write(t / "table.md", "mine"))],
        "is a file; --out names a folder",
    ),
    # ---- item 10: messages that blamed the wrong input
    "peft.r=0": ("finetune", lambda t, a: ["--peft.method=lora", "--peft.r=0"], "peft.r=0 must"),
    "peft.r=-8": (
        "finetune",
        lambda t, a: ["--peft.method=lora", "--peft.r=-8"],
        "peft.r=-8 must be at least 1",
    ),
    "peft.dropout=1.5": (
        "finetune",
        lambda t, a: ["--peft.method=lora", "--peft.dropout=1.5"],
        "peft.dropout=1.5 must be in [0, 1)",
    ),
    "model.dropout=1.5": (
        "finetune",
        lambda t, a: ["--model.dropout=1.5"],
        "model.dropout=1.5 must be in [0, 1)",
    ),
    "model path does not exist": (
        "finetune",
        lambda t, a: [f"--model.name_or_path={t / 'models' / 'tiny'}"],
        "tiny': it does not exist; give a model folder",
    ),
    "empty model folder": (
        "finetune",
        lambda t, a: [f"--model.name_or_path={empty_folder(t / 'empty_model')}"],
        "the folder is empty, so it holds no model",
    ),
    "adapter as model (training)": (
        "finetune",
        lambda t, a: [f"--model.name_or_path={adapter_folder(t, a)}"],
        "it is a LoRA adapter (adapter_config.json; base '",
    ),
    "adapter as model (evaluation)": (
        "evaluate",
        lambda t, a: [f"--model.name_or_path={adapter_folder(t, a)}"],
        "to evaluate it, set model.adapter_path=",
    ),
    "train_file is a folder": (
        "finetune",
        lambda t, a: [f"--data.train_file={jsonl(t / 'data' / 'train.jsonl', GOOD).parent}"],
        "data' is a folder; give one data file in it (it holds train.jsonl)",
    ),
    "latin-1 csv": (
        "finetune",
        train_file(
            lambda t: write(t / "l.csv", "dialogue,summary\nhi,a\ncafé,b\n".encode("latin-1"))
        ),
        "is not UTF-8 text (byte 0xe9 on line 3",
    ),
    "json array in a .jsonl": (
        "finetune",
        train_file(lambda t: write(t / "arr.jsonl", json.dumps(GOOD, indent=2))),
        "holds one JSON array, not JSON Lines (one object per line); rename it to arr.json",
    ),
    "json example in template": (
        "finetune",
        lambda t, a: ['--data.prompt_template=Answer as {"summary": "..."}: {dialogue}'],
        """to write literal braces, double them: '{{"summary": "..."}}'""",
    ),
    "misspelled section": (
        "finetune",
        lambda t, a: ["--config", str(write(t / "c.yaml", "trian:\n  max_steps: 2\n"))],
        "unknown config key 'trian' in config file",
    ),
    "target_modules without brackets": (
        "finetune",
        lambda t, a: ["--peft.method=lora", "--peft.target_modules=q,v"],
        "is not a list; write --peft.target_modules=[q,v]",
    ),
}


@pytest.fixture
def base_args(smoke_assets, tmp_path) -> dict[str, list[str]]:
    return {
        "finetune": [
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            f"--data.train_file={smoke_assets['train']}",
            f"--output_dir={tmp_path / 'out'}",
            "--train.max_steps=1",
            "--train.global_batch_size=4",
            "--train.micro_batch_size=2",
        ],
        "evaluate": [
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            f"--data.eval_file={smoke_assets['test']}",
            "--data.reference_columns=[summary]",
            f"--output_dir={tmp_path / 'out'}",
            "--generation.max_new_tokens=2",
        ],
        "compare": [],
        "evaluate --compare": [],
    }


def nothing_written(out: Path) -> bool:
    """check_output_dir may have made the folder (it probes that it can write); no file."""
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_compute(case, base_args, smoke_assets, tmp_path, capsys):
    recipe, make_args, expected = CASES[case]
    extra = make_args(tmp_path, smoke_assets)
    code, _, err = run_recipe(recipe, [*base_args[recipe], *extra], capsys)
    assert_one_error_line(code, err, expected)
    assert nothing_written(tmp_path / "out")
    if recipe != "finetune" and (tmp_path / "table.md").exists():
        assert (tmp_path / "table.md").read_text() == "mine"


def test_the_error_names_the_first_bad_row_and_counts_all_of_them(base_args, tmp_path, capsys):
    rows = with_row(1, summary=None)
    rows[3]["dialogue"] = ""
    rows[4]["summary"] = [1]
    path = jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = run_recipe(
        "finetune", [*base_args["finetune"], f"--data.train_file={path}"], capsys
    )
    line = assert_one_error_line(code, err, "line 2: 'summary' is null or missing; 3 of 6 rows")
    assert "data.skip_invalid_rows=true" in line and "'dialogue'/'summary'" in line


def test_skip_invalid_rows_trains_on_the_rest_and_says_how_many(base_args, tmp_path, capsys):
    """Needs train.py to pass data.skip_invalid_rows to data.load_split."""
    rows = with_row(1, summary=None) + GOOD
    path = jsonl(tmp_path / "d.jsonl", rows)
    args = [*base_args["finetune"], f"--data.train_file={path}", "--data.skip_invalid_rows=true"]
    code, out, err = run_recipe("finetune", args, capsys)
    assert code == 0, err
    assert "data.train_file: skipped 1 of 12 rows" in out
    assert "train: 11 examples" in out


def test_eval_skip_invalid_rows_keeps_file_row_numbers_as_ids(base_args, tmp_path, capsys):
    rows = with_row(1, dialogue=None)
    rows[3]["summary"] = ""
    path = jsonl(tmp_path / "e.jsonl", [{k: v for k, v in r.items()} for r in rows])
    args = [*base_args["evaluate"], f"--data.eval_file={path}", "--data.skip_invalid_rows=true"]
    code, out, err = run_recipe("evaluate", args, capsys)
    assert code == 0, err
    assert "data.eval_file: skipped 2 of 6 rows" in out
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()]
    assert [p["id"] for p in predictions] == ["0", "2", "4", "5"]


@pytest.mark.parametrize("recipe", ["finetune", "evaluate"])
def test_smoke_config_before_the_assets_exist_says_how_to_build_them(
    recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the smoke configs name .cache/smoke/... relative to here
    config = (
        REPO
        / "recipes"
        / "configs"
        / "smoke"
        / ("lora.yaml" if recipe == "finetune" else "evaluate.yaml")
    )
    code, _, err = run_recipe(recipe, ["--config", str(config)], capsys)
    line = assert_one_error_line(code, err, "the smoke assets are missing")
    assert "`make assets` or `python -m clustertune.smoke --cache-dir .cache`" in line
    assert not (tmp_path / ".cache").exists()
    assert nothing_written(
        tmp_path / "outputs" / ("smoke_lora" if recipe == "finetune" else "smoke_eval")
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_refused_before_compute(base_args, tmp_path, capsys):
    """Needs train.py to call cfg.train.check_trackers_installed() before compute."""
    args = [*base_args["finetune"], "--train.report_to=[wandb]"]
    code, _, err = run_recipe("finetune", args, capsys)
    assert_one_error_line(
        code, err, "needs the 'wandb' package, which is not installed; pip install wandb"
    )
    assert nothing_written(tmp_path / "out")
