"""The run folder's questions without training: checkpoint markers and their verification, the
newest usable checkpoint, what pruning may remove, which paths lie inside a run, the space
and permission checks (on a real full or read-only tmpfs where this machine lets us mount
one), and the one line clustertune-launch prints for a dead worker."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clustertune.checkpoint import launch_optimizer_settings
from clustertune.errors import UserError
from clustertune.plan import ParamCounts
from clustertune.plan_disk import output_sizes
from clustertune.run_folder import (
    CHECKPOINT_MARKER,
    RunFolder,
    checkpoint_damage,
    evaluation_evidence,
    inside_run_part,
    newest_verified,
    remove_checkpoint,
    training_run_evidence,
    write_checkpoint_marker,
)
from clustertune.storage import (
    OutputSizes,
    check_space,
    check_writable,
    free_bytes,
    remove_stale_probes,
    reported_write_failures,
)


def make_checkpoint(run: RunFolder, step: int, *, marker: bool = True) -> Path:
    """A checkpoint folder as the DDP path writes it (bytes are arbitrary), with its marker."""
    folder = run.checkpoint(step)
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "optimizer.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "trainable_parameters.safetensors").write_bytes(b"w" * 3000)
    (folder / "engine").mkdir()
    (folder / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"z" * 500)
    if marker:
        write_checkpoint_marker(folder, step=step, world_size=2, zero_stage=0)
    return folder


# ------------------------------------------------------------------ markers and verification


def test_the_marker_lists_every_file_with_its_size_and_checksum(tmp_path):
    folder = make_checkpoint(RunFolder(tmp_path), 2)
    files = json.loads((folder / CHECKPOINT_MARKER).read_text())["files"]
    assert set(files) == {
        "trainer_state.json",
        "optimizer.pt",
        "trainable_parameters.safetensors",
        "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert files["optimizer.pt"]["size"] == 10240 and len(files["optimizer.pt"]["crc32"]) == 8
    assert checkpoint_damage(folder) is None


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: (f / "optimizer.pt").write_bytes(b"x" * 100), "optimizer.pt has 100 bytes"),
        (
            lambda f: (f / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
            "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
        ),
        (  # the same size, another byte: only the checksum sees it
            lambda f: (f / "trainable_parameters.safetensors").write_bytes(b"v" + b"w" * 2999),
            "trainable_parameters.safetensors does not match the CRC-32",
        ),
        (lambda f: (f / CHECKPOINT_MARKER).write_text("{"), "COMPLETE.json cannot be read"),
        (lambda f: (f / CHECKPOINT_MARKER).unlink(), "it has no COMPLETE.json"),
        (lambda f: (f / CHECKPOINT_MARKER).write_text('{"step": 2}'), "lists no files"),
    ],
)
def test_a_damaged_checkpoint_is_named_with_its_first_damaged_file(tmp_path, damage, expected):
    folder = make_checkpoint(RunFolder(tmp_path), 2)
    damage(folder)
    problem = checkpoint_damage(folder)
    assert problem is not None and expected in problem, problem


def test_sizes_alone_miss_damage_in_place_which_the_checksum_finds(tmp_path):
    folder = make_checkpoint(RunFolder(tmp_path), 2)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 9}))  # same length
    assert checkpoint_damage(folder, checksums=False) is None
    assert "trainer_state.json does not match" in checkpoint_damage(folder)


def test_the_newest_checkpoint_that_verifies_is_chosen_and_the_others_named(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4, 6):
        make_checkpoint(run, step)
    make_checkpoint(run, 8, marker=False)  # incomplete: never a candidate, never named
    (run.checkpoint(6) / "optimizer.pt").write_bytes(b"")
    (run.checkpoint(4) / "trainer_state.json").write_text('{"step": 5}')
    choice = newest_verified(run)
    assert choice.path == run.checkpoint(2)
    warning = choice.warning()
    assert warning.startswith("clustertune: warning: damaged checkpoint skipped:")
    assert "step_6 (optimizer.pt has 0 bytes" in warning and "step_4 (trainer_state.json" in warning
    assert warning.endswith(f"resuming from {run.checkpoint(2)}.") and "\n" not in warning
    assert run.latest_complete() == run.checkpoint(4)  # sizes only: for plans and messages


def test_with_every_checkpoint_damaged_none_is_chosen_and_the_refusal_names_them(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4):
        make_checkpoint(run, step)
        (run.checkpoint(step) / "optimizer.pt").write_bytes(b"")
    choice = newest_verified(run)
    assert choice.path is None
    assert (
        "every checkpoint in" in choice.none_left() and "step_2: optimizer.pt" in choice.none_left()
    )
    assert newest_verified(RunFolder(tmp_path / "empty")).damaged == ()


# ------------------------------------------------------------------ pruning removes only ours


def test_removing_a_checkpoint_keeps_what_clustertune_did_not_write(tmp_path):
    run = RunFolder(tmp_path)
    ours = make_checkpoint(run, 2)
    (ours / "universal").mkdir()  # the conversion cache is ours too
    (ours / "universal" / "UNIVERSAL.json").write_text("{}")
    (ours / ".universal.lock").write_text("")
    assert remove_checkpoint(ours) == [] and not ours.exists()

    mixed = make_checkpoint(run, 4)
    (mixed / "my_adapter").mkdir()
    (mixed / "my_adapter" / "adapter_model.safetensors").write_bytes(b"user")
    assert remove_checkpoint(mixed) == ["my_adapter/adapter_model.safetensors"]
    assert sorted(p.name for p in mixed.iterdir()) == ["my_adapter"]

    unmarked = make_checkpoint(run, 6, marker=False)
    (unmarked / "notes.txt").write_text("mine")
    assert remove_checkpoint(unmarked) == ["notes.txt"]
    assert [p.name for p in unmarked.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ what a folder is


def test_paths_inside_a_run_are_named_and_others_are_not(tmp_path):
    run = RunFolder(tmp_path / "run")
    make_checkpoint(run, 2)
    run.final.mkdir()
    (run.final / "clustertune_final.json").write_text("{}")
    assert "inside the checkpoint" in inside_run_part(run.checkpoint(2) / "export")
    assert "inside the checkpoint" in inside_run_part(run.checkpoint(8))  # a future step
    assert "the checkpoints/ of the training run" in inside_run_part(run.checkpoints / "x")
    assert "the final/ of the training run" in inside_run_part(run.final / "eval")
    for free in (run.root / "eval", tmp_path / "exports" / "step_2", tmp_path / "final"):
        assert inside_run_part(free) is None, free
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)  # a user's folder of that name, no run
    assert inside_run_part(mine / "checkpoints" / "model") is None


def test_training_and_evaluation_folders_are_told_apart(tmp_path):
    run, evaluation = tmp_path / "run", tmp_path / "eval"
    run.mkdir()
    evaluation.mkdir()
    (run / "config.yaml").write_text("train:\n  max_steps: 4\n")
    (run / "metrics.jsonl").write_text("")
    (evaluation / "config.yaml").write_text("batch_size: 16\n")
    (evaluation / "rouge.json").write_text("{}")
    assert training_run_evidence(run) == ["config.yaml", "metrics.jsonl"]
    assert training_run_evidence(evaluation) == [] and evaluation_evidence(evaluation) == [
        "rouge.json"
    ]
    systems = tmp_path / "adapters"  # a multi-adapter job: each system's results in its folder
    (systems / "lora_a").mkdir(parents=True)
    (systems / "lora_a" / "rouge.json").write_text("{}")
    (systems / "comparison.md").write_text("")
    assert evaluation_evidence(systems) == ["lora_a/rouge.json"]
    comparison = tmp_path / "compare"  # a comparison alone is not an evaluation's results
    comparison.mkdir()
    (comparison / "comparison.md").write_text("")
    assert evaluation_evidence(comparison) == []


# ------------------------------------------------------------------ space and permissions


def test_the_peak_counts_keep_last_plus_one_checkpoints_or_final_and_what_exists():
    sizes = OutputSizes(checkpoint=100, final=250)
    assert sizes.peak(keep_last=2, existing_checkpoints=0) == 450  # 2 x 100 + 250 > 3 x 100
    assert sizes.peak(keep_last=3, existing_checkpoints=0) == 550
    assert sizes.peak(keep_last=3, existing_checkpoints=5) == 250  # 3 already held
    assert OutputSizes(100, 50, conversion=70).peak(keep_last=1, existing_checkpoints=1) == 170


def test_output_sizes_follow_the_states_each_strategy_saves():
    counts = ParamCounts(total=1000, trainable=100, largest_layer=200, largest_layer_name="e")

    def sizes(stage: int, **kw):
        args = dict(zero_stage=stage, weight_bytes=2, world_size=2, lora=True, merge=False)
        return output_sizes(counts, **{**args, "tokenizer_bytes": 7, "converts": False, **kw})

    overhead = (256 << 10) + 2 * (32 << 10)
    assert sizes(0).checkpoint == 12 * 100 + overhead  # fp32 weights + Adam's two moments
    assert sizes(2).checkpoint == 12 * 100 + 2 * 1000 + overhead  # + every 16-bit weight
    assert sizes(3).checkpoint == 12 * 100 + 2 * 900 + overhead  # + frozen fragments
    assert sizes(0).final == 4 * 100 + 7 and sizes(0, merge=True).final == 4 * 1100 + 7
    assert sizes(2, lora=False).final == 2 * (1000 + 3 * 200) + 7
    assert sizes(2, converts=True).conversion == 12 * 100 + 2 * 1000
    # FSDP2: the DCP checkpoint holds the whole fp32 model, the frozen base too
    assert sizes(0, fsdp=True).checkpoint == 12 * 100 + 4 * 900 + overhead
    assert sizes(0, fsdp=True, lora=False).final == 4 * 1000 + 7


def test_too_little_space_is_refused_naming_both_figures(tmp_path):
    free = free_bytes(tmp_path)
    with pytest.raises(UserError) as refused:
        check_space(tmp_path, OutputSizes(free, 1), keep_last=2, existing=0)
    message = str(refused.value)
    assert f"output_dir '{tmp_path}' has" in message and "needs about" in message
    assert "3 checkpoints of" in message and "checkpoint.keep_last=2" in message
    check_space(tmp_path, OutputSizes(1, 1), keep_last=2, existing=0)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (we are root on the test machines; skipped where mount is refused)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> None:
    """Fill the filesystem: the filler's last write fails with ENOSPC."""
    with open(mount / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
        handle.write(b"\0")


def test_a_probe_on_a_full_disk_is_refused_and_leaves_nothing(small_tmpfs):
    fill(small_tmpfs)
    with pytest.raises(UserError, match="is not writable \\(No space left on device\\)"):
        check_writable(small_tmpfs, "output_dir 'x'")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]


def test_a_probe_in_a_read_only_folder_is_refused(small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(UserError, match="Read-only file system\\); make it writable"):
        check_writable(small_tmpfs, "checkpoints/", "make it writable")


def test_probes_of_dead_processes_are_removed(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    dead = finished.stdout.strip()
    stale = tmp_path / f".write-probe-{socket.gethostname()}-{dead}"
    other_host = tmp_path / ".write-probe-elsewhere-1"
    stale.write_text("")
    other_host.write_text("")
    remove_stale_probes(tmp_path)
    assert not stale.exists() and other_host.exists()


def test_torch_save_on_a_full_disk_becomes_one_line_naming_the_file(small_tmpfs):
    target = small_tmpfs / "optimizer.pt"
    with pytest.raises(UserError) as failed:
        with reported_write_failures(small_tmpfs, "the previous checkpoint is intact."):
            torch.save(torch.zeros(1 << 20), target)  # 4 MiB into 1 MiB
    assert str(failed.value).startswith(f"cannot write {small_tmpfs}: No space left on device")
    with pytest.raises(RuntimeError, match="not about the disk"):  # anything else passes through
        with reported_write_failures(small_tmpfs, "x"):
            raise RuntimeError("not about the disk")


# ------------------------------------------------------------------ optimizer settings


def test_a_loaded_optimizer_state_keeps_this_launchs_settings():
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]

    def adamw(weight_decay: float, betas: tuple[float, float], eps: float):
        groups = [{"params": weights[:1], "weight_decay": weight_decay}]
        return torch.optim.AdamW(groups + [{"params": weights[1:], "weight_decay": 0.0}],
                                 betas=betas, eps=eps)  # fmt: skip

    saved = adamw(0.1, (0.9, 0.999), 1e-8).state_dict()
    plain = adamw(0.3, (0.8, 0.99), 1e-6)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["betas"] == (0.9, 0.999)  # what torch restores by itself
    kept = adamw(0.3, (0.8, 0.99), 1e-6)
    with launch_optimizer_settings(kept):
        kept.load_state_dict(saved)
    assert [g["weight_decay"] for g in kept.param_groups] == [0.3, 0.0]
    assert kept.param_groups[0]["betas"] == (0.8, 0.99) and kept.param_groups[1]["eps"] == 1e-6


# ------------------------------------------------------------------ a dead worker, in one line


def test_a_dead_worker_is_one_line_with_rank_signal_and_the_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from clustertune.launch import dead_worker_line
    from clustertune.stop import STATUS_FILE_ENV, record_run_folder

    status = tmp_path / "status"
    run = RunFolder(tmp_path / "run")
    make_checkpoint(run, 2)
    make_checkpoint(run, 4, marker=False)
    killed = ProcessFailure(local_rank=1, pid=123, exitcode=-9, error_file="<N/A>")
    error = ChildFailedError("finetune.py", {1: killed})
    assert "rerun the same command" in dead_worker_line(error, status)  # nothing recorded yet
    monkeypatch.setenv(STATUS_FILE_ENV, str(status))
    record_run_folder(run.root)
    line = dead_worker_line(error, status)
    assert line.startswith("clustertune-launch: rank 1 on ") and "killed by SIGKILL" in line
    assert f"resumes from {run.checkpoint(2).resolve()}" in line
    crashed = subprocess.CalledProcessError(3, ["python", "finetune.py"])
    assert "rank 0 on" in dead_worker_line(crashed, status) and "exited with code 3" in (
        dead_worker_line(crashed, status)
    )
    assert dead_worker_line(ValueError("other"), status) is None
