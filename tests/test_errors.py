"""Bad input: one clear line naming the problem, a non-zero exit, no half-written final/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, describe, load_recipe, run


def finetune(args: list[str], capsys) -> tuple[int, str]:
    """Run recipes/finetune.py's main() in this process (fast), as a user would call it."""
    recipe = load_recipe("finetune")

    sys.argv = ["finetune.py", *args]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def base_args(smoke_assets, tmp_path):
    return [
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--output_dir={tmp_path / 'out'}",
        "--train.max_steps=1",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=2",
    ]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {
    "missing file": (lambda t: ["--data.train_file=" + str(t / "missing.jsonl")], "does not exist"),
    "missing column": (
        lambda t: [
            "--data.train_file=" + str(write(t / "a.jsonl", '{"dialogue": "x", "abstract": "y"}\n'))
        ],
        "no column 'summary'",
    ),
    "malformed jsonl": (
        lambda t: [
            "--data.train_file="
            + str(write(t / "b.jsonl", '{"dialogue": "x", "summary": "y"}\n{oops\n'))
        ],
        "b.jsonl:2: malformed JSON line",
    ),
    "empty split": (
        lambda t: ["--data.train_file=" + str(write(t / "c.jsonl", ""))],
        "has no examples",
    ),
    "unknown key": (lambda t: ["--train.learnig_rate=1"], "did you mean 'train.learning_rate'"),
    "fp16 with t5": (lambda t: ["--model.dtype=fp16"], "T5 was trained in bfloat16"),
    "indivisible batch": (
        lambda t: ["--train.global_batch_size=5"],
        "not divisible by micro_batch_size=2",
    ),
    "unreadable model": (
        lambda t: ["--model.name_or_path=" + str(t / "no-model")],
        "model.name_or_path: cannot load",
    ),
    "output_dir not writable": (
        lambda t: ["--output_dir=" + str(write(t / "file", "x") / "sub")],
        "is not writable",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, base_args, tmp_path, capsys):
    make_args, expected = CASES[case]
    code, err = finetune([*base_args, *make_args(tmp_path)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("clustertune: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "final").exists()


def test_real_process_exit_code_and_single_line(base_args, tmp_path):
    result = run(
        [
            sys.executable,
            str(REPO / "recipes" / "finetune.py"),
            *base_args,
            "--train.global_batch_size=5",
        ]
    )
    assert result.returncode == 2, describe(result)
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("clustertune: error: train.global_batch_size=5")
    )


def test_training_on_missing_data_writes_nothing_final(base_args, tmp_path, capsys):
    code, _ = finetune([*base_args, "--data.eval_file=" + str(tmp_path / "nope.csv")], capsys)
    assert code == 2
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "checkpoints").exists()
    assert not out.exists() or "metrics.jsonl" not in json.dumps([p.name for p in out.iterdir()])


def test_user_error_keeps_exit_code_2_through_the_launcher(base_args):
    """torchrun reports any failed worker as 1; clustertune-launch restores the 2."""
    from helpers import launch_command

    args = [a for a in base_args if not a.startswith("--train.global_batch_size")] + [
        "--train.global_batch_size=5"
    ]
    result = run(launch_command("recipes/finetune.py", args, launch="ddp", nproc=2))
    assert result.returncode == 2, describe(result)
    assert "clustertune: error: train.global_batch_size=5" in result.stderr


def test_stale_jit_build_lock_is_named_with_its_fix(tmp_path, monkeypatch, capsys):
    """A process killed while building a DeepSpeed op leaves `lock` behind and every later
    ZeRO launch waits on it forever; a fresh lock (a build in progress) is not reported."""
    import os
    import time

    from clustertune.distributed import (
        STALE_LOCK_SECONDS,
        stale_extension_locks,
        warn_stale_extension_locks,
    )

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert stale_extension_locks() == [old]
    assert stale_extension_locks(now=time.time() + STALE_LOCK_SECONDS + 1) == [fresh, old]
    warn_stale_extension_locks.cache_clear()  # it warns once per process
    warn_stale_extension_locks()
    err = capsys.readouterr().err
    assert str(old) in err and f"rm -rf {old.parent}" in err and "cpu_adam" not in err
