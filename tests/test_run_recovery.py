"""A run survives a damaged checkpoint, a full disk and a read-only folder: the real recipe, one
process, on the smallest smoke model.

One LoRA run (6 steps, checkpoints at steps 2 and 4) is trained once; each test works on a copy
with final/ removed (an unfinished run whose newest checkpoint is step_4) and reruns the same
command. A fallback must reproduce the uninterrupted losses of the steps after it. The full disk
is a real one: a small tmpfs, filled at the moment under test by the recipe's test-only hook
(storage.FILL_DISK_ENV); the read-only folder is a tmpfs remounted read-only (we run as root,
for whom permission bits do not refuse a write). Both are skipped where mount is not allowed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, describe, recipe_env, run, train_losses

from clustertune.run_folder import RunFolder, checkpoint_damage
from clustertune.storage import FILL_DISK_ENV

EXACT = 1e-6  # one process, fp32 on CPU: a resumed curve equals the uninterrupted one


def train_args(smoke_assets, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--output_dir={out}",
        "--data.max_source_length=100",
        "--data.max_target_length=32",
        "--model.dropout=0.0",
        "--peft.method=lora",
        "--train.max_steps=6",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=4",
        "--train.learning_rate=1e-3",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=3",
        *extra,
    ]


def finetune(smoke_assets, out: Path, *extra: str, env: dict[str, str] | None = None):
    command = [sys.executable, str(REPO / "recipes" / "finetune.py")]
    return run([*command, *train_args(smoke_assets, out, *extra)], env=env)


def lines_of(text: str, start: str) -> list[str]:
    """Lines (progress bars split off) that start with `start`."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.startswith(start)]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = lines_of(result.stderr, "clustertune: error:")
    assert result.returncode == 2, describe(result)
    assert len(errors) == 1 and "Traceback" not in result.stderr, describe(result)
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(smoke_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recovery") / "run"
    result = finetune(smoke_assets, out)
    assert result.returncode == 0, describe(result)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_2", "step_4"]
    return out


@pytest.fixture
def unfinished(finished, tmp_path) -> Path:
    """A copy of the run stopped after its step-4 checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "final")
    return copy


def assert_continues_exactly(out: Path, finished: Path, after: int) -> None:
    resumed, reference = train_losses(out), train_losses(finished)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(after + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=EXACT, abs=EXACT), step
    assert RunFolder(out).is_finished()


# ------------------------------------------------------------------ damaged checkpoints


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def invalid_json_of_the_same_size(path: Path) -> None:
    path.write_text("{" * path.stat().st_size)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("optimizer.pt", truncate_half),
        ("trainable_parameters.safetensors", lambda p: p.write_bytes(p.read_bytes()[:10])),
        ("trainer_state.json", invalid_json_of_the_same_size),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    name, damage, unfinished, finished, smoke_assets
):
    damage(unfinished / "checkpoints" / "step_4" / name)
    result = finetune(smoke_assets, unfinished)
    assert result.returncode == 0, describe(result)
    warnings = lines_of(result.stderr, "clustertune: warning: damaged checkpoint skipped:")
    assert len(warnings) == 1 and "Traceback" not in result.stderr, describe(result)
    assert f"step_4 ({name}" in warnings[0] and warnings[0].endswith("step_2."), warnings
    assert f"resumed from {unfinished / 'checkpoints' / 'step_2'} at step 2" in result.stdout
    assert_continues_exactly(unfinished, finished, after=2)
    assert checkpoint_damage(unfinished / "checkpoints" / "step_4") is None  # replaced
    replaced = lines_of(result.stdout, "replaced ")
    assert len(replaced) == 1 and f"step_4 ({name}" in replaced[0], replaced  # the same reason


def test_a_checkpoint_without_its_marker_is_trained_again_and_replaced(
    unfinished, finished, smoke_assets
):
    (unfinished / "checkpoints" / "step_4" / "COMPLETE.json").unlink()
    result = finetune(smoke_assets, unfinished)
    assert result.returncode == 0, describe(result)
    assert "resumed from" in result.stdout and "step_2 at step 2" in result.stdout
    assert "replaced" in result.stdout and "it has no COMPLETE.json" in result.stdout
    assert_continues_exactly(unfinished, finished, after=2)
    again = finetune(smoke_assets, unfinished)
    assert again.returncode == 0 and "already finished at step 6" in again.stdout


def test_with_every_checkpoint_damaged_the_run_stops_in_one_line(unfinished, smoke_assets):
    for step in (2, 4):
        truncate_half(unfinished / "checkpoints" / f"step_{step}" / "optimizer.pt")
    before = snapshot(unfinished)
    line = one_error_line(finetune(smoke_assets, unfinished))
    assert "every checkpoint in" in line and "step_4: optimizer.pt has" in line, line
    assert "step_2: optimizer.pt" in line and "move" in line and "aside" in line
    assert snapshot(unfinished) == before


def test_resuming_a_named_damaged_checkpoint_is_refused(unfinished, smoke_assets):
    step_4 = unfinished / "checkpoints" / "step_4"
    truncate_half(step_4 / "optimizer.pt")
    before = snapshot(unfinished)
    line = one_error_line(finetune(smoke_assets, unfinished, f"--resume={step_4}"))
    assert f"resume='{step_4}': the checkpoint is damaged (optimizer.pt has" in line, line
    assert snapshot(unfinished) == before


def test_pruning_removes_only_what_clustertune_wrote(unfinished, finished, smoke_assets):
    checkpoints = unfinished / "checkpoints"
    shutil.rmtree(checkpoints / "step_4")  # resumes from step_2, saves step_4, prunes step_2
    (checkpoints / "step_2" / "my_export").mkdir()
    (checkpoints / "step_2" / "my_export" / "adapter_model.safetensors").write_bytes(b"mine")
    (checkpoints / "exported_adapter").mkdir()
    (checkpoints / "exported_adapter" / "adapter_config.json").write_text("{}")
    result = finetune(smoke_assets, unfinished, "--checkpoint.keep_last=1")
    assert result.returncode == 0, describe(result)
    assert "kept" in result.stdout and "my_export/adapter_model.safetensors" in result.stdout
    assert [p.name for p in (checkpoints / "step_2").iterdir()] == ["my_export"]
    assert (checkpoints / "exported_adapter" / "adapter_config.json").read_text() == "{}"
    assert_continues_exactly(unfinished, finished, after=2)


# ------------------------------------------------------------------ identity


def test_another_learning_rate_on_resume_is_refused_or_continued_when_allowed(
    unfinished, smoke_assets
):
    before = snapshot(unfinished)
    line = one_error_line(finetune(smoke_assets, unfinished, "--train.learning_rate=2e-3"))
    assert "step_4 was made with different settings" in line, line
    assert "train.learning_rate: 0.001 -> 0.002" in line and "allow_config_change=true" in line
    assert snapshot(unfinished) == before
    allowed = finetune(
        smoke_assets, unfinished, "--train.learning_rate=2e-3", "--allow_config_change=true"
    )
    assert allowed.returncode == 0, describe(allowed)
    assert "allow_config_change=true: resuming" in allowed.stdout
    assert "train.learning_rate: 0.001 -> 0.002" in allowed.stdout
    records = {
        r["step"]: r for r in map(json.loads, open(unfinished / "metrics.jsonl")) if "loss" in r
    }
    # linear decay to 0 at step 6: the lr logged after step 5 is the one step 6 uses
    assert records[5]["lr"] == pytest.approx(2e-3 * (1 - 5 / 6))
    assert records[3]["lr"] == pytest.approx(1e-3 * (1 - 3 / 6))  # before the resume: kept


# ------------------------------------------------------------------ a full disk, a read-only folder


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def no_temporaries(out: Path) -> None:
    left = [p.name for p in out.rglob(".*") if p.name != ".gitignore"]
    assert not left, left


@pytest.mark.parametrize("moment", ["step_4", "final"])
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(
    moment, tmpfs, unfinished, finished, smoke_assets
):
    out = tmpfs / "run"
    shutil.copytree(unfinished, out)
    shutil.rmtree(out / "checkpoints" / "step_4")  # it resumes from step_2 and saves step_4
    step_2 = snapshot(out / "checkpoints" / "step_2")
    filler = tmpfs / "filler"
    result = finetune(smoke_assets, out, env=recipe_env(**{FILL_DISK_ENV: f"{moment}={filler}"}))
    line = one_error_line(result)
    assert "No space left on device" in line, line
    if moment == "step_4":
        assert f"cannot write {out / 'checkpoints' / '.tmp-step_4'}/" in line
        assert f"{out / 'checkpoints' / 'step_2'} is intact" in line and "resume from it" in line
        assert not (out / "checkpoints" / "step_4").exists()
    else:
        assert f"cannot write {out / '.final.tmp'}" in line and "no " in line
        assert f"it resumes from {out / 'checkpoints' / 'step_4'}" in line
        assert not (out / "final").exists()
    no_temporaries(out)
    assert snapshot(out / "checkpoints" / "step_2") == step_2
    filler.unlink()
    again = finetune(smoke_assets, out)
    assert again.returncode == 0, describe(again)
    assert_continues_exactly(out, finished, after=2 if moment == "step_4" else 4)


def test_too_little_space_is_refused_before_compute(tmpfs, smoke_assets):
    (tmpfs / "filler").write_bytes(b"\0" * (31 << 20))  # leaves 1 MiB of 32
    out = tmpfs / "run"
    line = one_error_line(finetune(smoke_assets, out))
    assert f"output_dir '{out}' has 1.0 MiB free, but this run needs about" in line, line
    assert "4 checkpoints of" in line and "checkpoint.keep_last=3" in line
    assert not out.exists() or not any(out.iterdir())


def test_a_read_only_checkpoints_folder_is_refused_before_step_1(tmpfs, unfinished, smoke_assets):
    checkpoints = unfinished / "checkpoints"
    shutil.copytree(checkpoints, tmpfs, dirs_exist_ok=True)
    shutil.rmtree(checkpoints)
    checkpoints.mkdir()
    subprocess.run(["mount", "--bind", str(tmpfs), str(checkpoints)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(checkpoints)], check=True)
        metrics = (unfinished / "metrics.jsonl").read_bytes()
        line = one_error_line(finetune(smoke_assets, unfinished))
        assert f"checkpoints/ of output_dir '{unfinished}'" in line, line
        assert "is not writable (Read-only file system)" in line
        assert (unfinished / "metrics.jsonl").read_bytes() == metrics  # no step was trained
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
