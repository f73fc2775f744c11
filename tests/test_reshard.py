"""Resume on another world size (issue 14): real launches, 1 and 2 CPU processes over gloo.

Each case is one chain of three launches of the same 10-step run (fp32, dropout 0, weight decay
0.01 so that ZeRO-3's two optimizer param groups differ), checkpoints every 3 steps:

    A  1 rank,   steps 1-10 uninterrupted                    (the reference)
    B  2 ranks,  resume=A/checkpoints/step_3  (1 -> 2 ranks)  steps 4-10, saves step_6
    C  1 rank,   resume=auto over a copy of B's step_6 (2 -> 1 ranks)  steps 7-10

B and C must give A's losses within 1e-5 relative. 1 rank x micro 2 x accum 4 and 2 ranks x
micro 2 x accum 2 take the same optimizer steps (the batch plan does not depend on the world
size), so both shapes continue the same run. ZeRO conversions are DeepSpeed's universal
checkpoint, cached in the step folder; the ZeRO-2 full chain is also killed once during the
conversion before C. Around the chains: refusals of other strategies, concurrent conversion,
consolidated weights, and clustertune-submit --dry-run saying it will reshard.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import describe, launch_command, recipe_env, run, train_losses

from clustertune.errors import UserError
from clustertune.reshard import CRASH_ENV, convert_to_universal, resume_plan
from clustertune.run_folder import (
    UNIVERSAL_DIR,
    UNIVERSAL_LOCK,
    UNIVERSAL_MARKER,
    UNIVERSAL_TMP_PREFIX,
)

pytestmark = pytest.mark.multiproc

MAX_STEPS = 10
RELATIVE = 1e-5  # fp32 on CPU: measured ~5e-8
CASES = [
    ("zero2", "none"),
    ("zero2", "lora"),
    ("zero3", "none"),
    ("zero3", "lora"),
    ("ddp", "lora"),
]
MATRIX: list[str] = []  # rows for the closing summary (pytest -s)


def args(assets, out: Path, peft: str, **overrides) -> list[str]:
    values = {
        "model.name_or_path": assets["tiny_t5"],
        "data.train_file": assets["train"],
        "data.max_target_length": 64,
        "output_dir": out,
        "peft.method": peft,
        "peft.dropout": 0.0,
        "model.dropout": 0.0,
        "train.max_steps": MAX_STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.learning_rate": 1e-3,
        "train.warmup_steps": 2,
        "train.weight_decay": 0.01,
        "train.log_every_steps": 1,
        "checkpoint.every_steps": 3,
        "checkpoint.keep_last": 3,
    }
    values.update(overrides)
    return [f"--{key}={value}" for key, value in values.items()]


def launch(launch_file: str, nproc: int, assets, out: Path, peft: str, env=None, **overrides):
    command = launch_command(
        "recipes/finetune.py", args(assets, out, peft, **overrides), launch=launch_file, nproc=nproc
    )
    return run(command, env=env)


def relative_gap(actual: dict[int, float], expected: dict[int, float], steps) -> float:
    return max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in steps)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Chain:
    reference: Path  # A
    grown: Path  # B: 1 -> 2 ranks
    grown_log: str
    shrunk: Path  # C: 2 -> 1 ranks
    shrunk_log: str
    seconds: float
    crash: dict | None = None  # the ZeRO-2 full chain: what a kill during conversion left


_CHAINS: dict[tuple[str, str], Chain] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reshard")


def chain(launch_file: str, peft: str, assets, workdir: Path) -> Chain:
    key = (launch_file, peft)
    if key in _CHAINS:
        return _CHAINS[key]
    began = time.monotonic()
    base = workdir / f"{launch_file}-{peft}"
    a, b, c = base / "A", base / "B", base / "C"
    result = launch(launch_file, 1, assets, a, peft)
    assert result.returncode == 0, describe(result)
    grown = launch(launch_file, 2, assets, b, peft, resume=a / "checkpoints" / "step_3")
    assert grown.returncode == 0, describe(grown)
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(b / "checkpoints" / "step_6", c / "checkpoints" / "step_6")
    crash = None
    if key == ("zero2", "none"):  # killed after converting, before the rename
        engine_before = tree_digest(c / "checkpoints" / "step_6" / "engine")
        killed = launch(launch_file, 1, assets, c, peft, env=recipe_env(**{CRASH_ENV: "1"}))
        step = c / "checkpoints" / "step_6"
        crash = {
            "returncode": killed.returncode,
            "left": sorted(p.name for p in step.iterdir()),
            "engine_unchanged": tree_digest(step / "engine") == engine_before,
            "final": (c / "final").exists(),
        }
    shrunk = launch(launch_file, 1, assets, c, peft)
    assert shrunk.returncode == 0, describe(shrunk)
    _CHAINS[key] = Chain(a, b, grown.stdout, c, shrunk.stdout, time.monotonic() - began, crash)
    return _CHAINS[key]


@pytest.mark.parametrize(("launch_file", "peft"), CASES)
def test_resume_on_another_world_size_is_exact(launch_file, peft, smoke_assets, workdir):
    runs = chain(launch_file, peft, smoke_assets, workdir)
    reference = train_losses(runs.reference)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    grown, shrunk = train_losses(runs.grown), train_losses(runs.shrunk)
    assert "resharded from 1 to 2 ranks" in runs.grown_log, runs.grown_log[-3000:]
    assert "resharded from 2 to 1 ranks" in runs.shrunk_log, runs.shrunk_log[-3000:]
    gap_grown = relative_gap(grown, reference, range(4, MAX_STEPS + 1))
    gap_shrunk = relative_gap(shrunk, reference, range(7, MAX_STEPS + 1))
    strategy = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "ddp": "DDP"}[launch_file]
    kind = "LoRA" if peft == "lora" else "full"
    MATRIX.append(
        f"1 -> 2 ranks (step 3), {strategy} {kind}: max relative |d loss| {gap_grown:.1e}"
    )
    MATRIX.append(
        f"2 -> 1 ranks (step 6), {strategy} {kind}: max relative |d loss| {gap_shrunk:.1e}"
    )
    print(f"\n{MATRIX[-2]}\n{MATRIX[-1]}\nchain of 3 launches: {runs.seconds:.0f} s")
    assert gap_grown <= RELATIVE and gap_shrunk <= RELATIVE, (grown, shrunk, reference)
    assert (runs.shrunk / "final").is_dir()
    for step in (runs.reference / "checkpoints" / "step_3", runs.shrunk / "checkpoints" / "step_6"):
        if launch_file == "ddp":  # the whole state in one file: nothing to convert
            assert not (step / UNIVERSAL_DIR).exists()
            continue
        marker = json.loads((step / UNIVERSAL_DIR / UNIVERSAL_MARKER).read_text())
        assert marker["world_size"] in (1, 2) and not list(step.glob(f"{UNIVERSAL_TMP_PREFIX}*"))
        print(f"{step.name}: converted in {marker['seconds']} s, {marker['size_bytes']:,} bytes")
    if launch_file != "ddp":
        assert "converted " in runs.grown_log and "universal checkpoint in" in runs.grown_log


def test_kill_during_conversion_then_resume(smoke_assets, workdir):
    """The ZeRO-2 full chain's C was first killed (os._exit) with the conversion written but
    not yet renamed into place: the checkpoint is untouched, the new shape resumes exactly."""
    runs = chain("zero2", "none", smoke_assets, workdir)
    crash = runs.crash
    assert crash["returncode"] != 0 and not crash["final"], crash
    assert any(name.startswith(UNIVERSAL_TMP_PREFIX) for name in crash["left"]), crash
    assert UNIVERSAL_DIR not in crash["left"] and crash["engine_unchanged"], crash
    step = runs.shrunk / "checkpoints" / "step_6"
    assert (step / UNIVERSAL_DIR / UNIVERSAL_MARKER).is_file()
    assert not list(
        step.glob(f"{UNIVERSAL_TMP_PREFIX}*")
    )  # the next conversion removed the leftover
    gap = relative_gap(train_losses(runs.shrunk), train_losses(runs.reference), range(7, 11))
    assert gap <= RELATIVE


def _convert_once(checkpoint: str) -> bool:
    return convert_to_universal(Path(checkpoint)).converted_now


def test_concurrent_conversions_convert_once(smoke_assets, workdir, tmp_path):
    """Three processes (as three jobs on a shared output_dir) convert one checkpoint at once."""
    source = chain("zero3", "lora", smoke_assets, workdir).grown / "checkpoints" / "step_9"
    step = tmp_path / "step_9"
    shutil.copytree(source, step)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        converted = pool.map(_convert_once, [str(step)] * 3)
    assert sorted(converted) == [False, False, True], converted
    assert (step / UNIVERSAL_DIR / UNIVERSAL_MARKER).is_file() and (step / UNIVERSAL_LOCK).is_file()
    assert not list(step.glob(f"{UNIVERSAL_TMP_PREFIX}*"))
    assert not convert_to_universal(step).converted_now  # cached: done once


def test_other_strategies_are_refused_with_what_is_possible(smoke_assets, workdir):
    ddp = chain("ddp", "lora", smoke_assets, workdir).grown / "checkpoints" / "step_6"
    zero2 = chain("zero2", "lora", smoke_assets, workdir).grown / "checkpoints" / "step_6"
    zero3 = chain("zero3", "lora", smoke_assets, workdir).grown / "checkpoints" / "step_6"
    refusals = [
        (ddp, 2, "launch/ddp.yaml or launch/single_gpu.yaml (any number of processes)"),
        (zero2, 3, "resume it with launch/zero1.yaml, launch/zero2.yaml or launch/fsdp2.yaml (any"),
        (zero3, 0, "launch/zero3.yaml, launch/zero3_offload.yaml or launch/fsdp2.yaml (any"),
    ]
    for checkpoint, stage, possible in refusals:
        with pytest.raises(UserError) as refused:
            resume_plan(checkpoint, world_size=1, zero_stage=stage)
        assert possible in str(refused.value) and "\n" not in str(refused.value)
    # ZeRO-1 and 2 share the universal layout: another stage of the two loads it
    note = resume_plan(zero2, world_size=2, zero_stage=1)
    assert "will load it as ZeRO-1" in note
    assert resume_plan(zero2, world_size=2, zero_stage=2) is None  # as saved: a plain load
    # end to end: the launch refuses before any compute, in one line
    refused = launch("zero2", 1, smoke_assets, workdir / "refused", "lora", resume=ddp)
    lines = [line for line in refused.stderr.splitlines() if "clustertune: error:" in line]
    assert refused.returncode == 2 and len(lines) == 1, describe(refused)
    assert (
        "made by DDP on 2 rank(s) and cannot continue under a DeepSpeed (ZeRO) launch" in lines[0]
    )


def test_layout_of_checkpoints_that_did_not_record_their_stage(tmp_path):
    """Checkpoints made before COMPLETE.json recorded zero_stage: read from DeepSpeed's file
    names (ZeRO-3 writes model states per rank); on their own world size they load as before."""
    from clustertune.reshard import needs_universal, saved_layout

    for name, stage in (
        ("zero_pp_rank_0_mp_rank_00_model_states.pt", 3),
        ("mp_rank_00_model_states.pt", None),
    ):
        step = tmp_path / str(stage) / "step_3"
        (step / "engine").mkdir(parents=True)
        (step / "engine" / name).write_bytes(b"")
        (step / "COMPLETE.json").write_text('{"step": 3, "world_size": 2}')
        assert saved_layout(step).zero_stage == stage
        assert not needs_universal(step, world_size=2, zero_stage=stage or 2)
        assert needs_universal(step, world_size=1, zero_stage=stage or 2)
        # under FSDP2 a ZeRO checkpoint is read from its universal form, on any world size
        assert needs_universal(step, world_size=2, zero_stage=0, fsdp=True)
    shutil.rmtree(step / "engine")
    assert saved_layout(step).zero_stage == 0  # no engine/: DDP or one process


def test_consolidate_writes_the_trained_fp32_weights(smoke_assets, workdir, tmp_path):
    """clustertune-checkpoint consolidate (DeepSpeed's zero_to_fp32) against the universal
    checkpoint (DeepSpeed's ds_to_universal) of the same 2-rank step: the same tensors."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from clustertune.checkpoint_cli import consolidate, convert

    for launch_file, peft in (("zero2", "none"), ("zero3", "lora")):
        step = chain(launch_file, peft, smoke_assets, workdir).grown / "checkpoints" / "step_9"
        universal = tmp_path / f"{launch_file}-{peft}-universal"
        assert "converted: " in convert(step, universal, workers=1)
        out = tmp_path / f"{launch_file}-{peft}-model"
        assert str(out) in consolidate(step, out)
        if peft == "lora":
            base = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
            model = PeftModel.from_pretrained(base, str(out))
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(out)
        compared = 0
        for name, parameter in model.named_parameters():
            saved = universal / "engine" / "zero" / name / "fp32.pt"
            if peft == "lora" and "lora_" not in name:  # the frozen base: not trained
                continue
            if saved.is_file():
                expected = torch.load(saved, weights_only=False)  # ZeRO-1/2 write {"param": t}
                expected = expected["param"] if isinstance(expected, dict) else expected
                assert torch.equal(parameter.detach(), expected.view_as(parameter)), name
                compared += 1
        assert compared >= (24 if peft == "lora" else 40), compared


def test_dry_run_says_it_will_reshard(smoke_assets, workdir, tmp_path, capsys, monkeypatch):
    import sys

    import yaml
    from helpers import REPO

    from clustertune.slurm import cli

    out = chain("zero2", "lora", smoke_assets, workdir).grown  # checkpoints made on 2 ranks
    # Only now (the launches need the compiler on PATH): no SLURM tools, so only a dry run.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    settings = yaml.safe_load((REPO / "slurm/dev-cluster.yaml").read_text())
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({**settings, "folder": str(tmp_path)}))
    recipe = ["recipes/finetune.py", *args(smoke_assets, out, "lora")]
    common = ["--config", str(tmp_path / "cluster.yaml"), "--nodes", "1"]
    code = cli.main([*common, "--processes-per-node", "1", "--dry-run", "--", *recipe])
    shown = capsys.readouterr()
    assert code == 0, shown.err
    assert "will reshard from 2 to 1 ranks" in shown.out and "step_9" in shown.out, shown.out
    # ZeRO-2 checkpoints under ZeRO-3: the job would refuse them at start, and preflight says so
    assert cli.main([*common, "--launch", "launch/zero3.yaml", "--dry-run", "--", *recipe]) == 0
    warned = capsys.readouterr().err
    assert "warning: the job will stop before training: the checkpoint in" in warned, warned
    assert "resume it with launch/zero1.yaml, launch/zero2.yaml or launch/fsdp2.yaml" in warned


def test_zz_print_resume_matrix():
    """The matrix of this session's chains (pytest -s shows it)."""
    print("\nresume matrix:\n" + "\n".join(MATRIX))
