"""The DeepSpeed JSON named by a launch file: checked with DeepSpeed's own config model before
any compute (one line naming the key and the nearest valid one), and the configs users copy
from the transformers DeepSpeed guide accepted: optimizer / scheduler blocks with "auto"
filled from the training config, DeepSpeed building the optimizer and schedule they name.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, describe, launch_command, load_recipe, recipe_env, run, train_losses

from clustertune.config import TrainConfig
from clustertune.deepspeed_config import (
    HIDDEN_SIZE_KEYS,
    fill_deepspeed_config,
    fill_hidden_size_autos,
    fill_optimizer_autos,
    fill_scheduler_autos,
)
from clustertune.errors import UserError

SHIPPED_ZERO2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
WHERE = "the DeepSpeed config"  # no launch file in a unit test: no path to name
AUTO_OPTIMIZER = {
    "type": "AdamW",
    "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
}


def auto_scheduler(kind: str = "WarmupDecayLR") -> dict:
    params = {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
    if kind == "WarmupDecayLR":
        params["total_num_steps"] = "auto"
    return {"type": kind, "params": params}


# From the transformers DeepSpeed guide (docs/source/en/deepspeed.md), as users copy them.
GUIDE_ZERO2 = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": AUTO_OPTIMIZER,
    "scheduler": auto_scheduler("WarmupLR"),
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
GUIDE_ZERO3 = {
    **{k: v for k, v in GUIDE_ZERO2.items() if k != "zero_optimization"},
    "scheduler": auto_scheduler("WarmupDecayLR"),
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def fill(raw: dict, dtype: str = "fp32") -> dict:
    return fill_deepspeed_config(
        raw, micro_batch_size=2, grad_accum_steps=2, world_size=2, max_grad_norm=1.0, dtype=dtype
    )


def autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def zero2_with(change) -> dict:
    config = copy.deepcopy(SHIPPED_ZERO2)
    change(config)
    return config


def renamed(config: dict, old: str, new: str) -> None:
    config[new] = config.pop(old)


# ---------------------------------------------------------------- validation (item 6, 7)

BAD_JSON = {
    "unknown nested key": (
        lambda c: c["zero_optimization"].update(overlap_comms=True),
        f"{WHERE} has an unknown key 'zero_optimization.overlap_comms'; "
        "did you mean 'zero_optimization.overlap_comm'?",
    ),
    "zero stage 5": (
        lambda c: c["zero_optimization"].update(stage=5),
        f"{WHERE}: zero_optimization.stage=5 is invalid; use one of 0, 1, 2, 3.",
    ),
    "misspelled zero_optimization section": (
        lambda c: renamed(c, "zero_optimization", "zero_optimisation"),
        f"{WHERE} has an unknown top-level key 'zero_optimisation' (DeepSpeed would ignore it); "
        "did you mean 'zero_optimization'?",
    ),
    "unknown top-level key": (
        lambda c: c.update(gradient_clip=1.0),
        f"{WHERE} has an unknown top-level key 'gradient_clip' (DeepSpeed would ignore it); "
        "did you mean 'gradient_clipping'?",
    ),
    "unknown top-level key, nothing close": (
        lambda c: c.update(my_notes="x"),
        f"{WHERE} has an unknown top-level key 'my_notes' (DeepSpeed would ignore it); remove it.",
    ),
    "unknown key two levels down": (
        lambda c: c["zero_optimization"].update(
            offload_optimizer={"device": "cpu", "pin_memry": True}
        ),
        f"{WHERE} has an unknown key 'zero_optimization.offload_optimizer.pin_memry'; "
        "did you mean 'zero_optimization.offload_optimizer.pin_memory'?",
    ),
    "wrong value type": (
        lambda c: c["zero_optimization"].update(allgather_bucket_size="big"),
        f'{WHERE}: zero_optimization.allgather_bucket_size="big" is invalid: Input should be a '
        "valid integer, unable to parse string as an integer.",
    ),
    "unknown precision key": (
        lambda c: c["fp16"].update(loss_scal=0),
        f"{WHERE} has an unknown key 'fp16.loss_scal'; did you mean 'fp16.loss_scale'?",
    ),
    "no zero_optimization section": (
        lambda c: c.pop("zero_optimization"),
        f"{WHERE} has no zero_optimization section (accelerate requires one); add e.g. "
        '"zero_optimization": {"stage": 2}.',
    ),
    "removed DeepSpeed feature": (
        lambda c: c.update(elasticity={"enabled": True}),
        f"{WHERE} is refused by DeepSpeed: Elastic training has been removed; the 'elasticity' "
        "configuration block is no longer supported. Set train_batch_size / "
        "train_micro_batch_size_per_gpu / gradient_accumulation_steps directly.",
    ),
    "unknown optimizer type": (
        lambda c: c.update(optimizer={"type": "AdamWW", "params": {}}),
        f"{WHERE}: optimizer.type 'AdamWW' is not one DeepSpeed knows; did you mean 'AdamW'?",
    ),
    "unknown scheduler type": (
        lambda c: c.update(scheduler={"type": "warmuplr", "params": {}}),
        f"{WHERE}: scheduler.type 'warmuplr' is not one DeepSpeed knows; did you mean 'WarmupLR'?",
    ),
    "auto nobody owns": (
        lambda c: c.update(optimizer={"type": "SGD", "params": {"lr": "auto", "momentum": "auto"}}),
        f"{WHERE} has 'auto' for ['optimizer.params.momentum'], which no training setting owns; "
        "give numbers.",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_deepspeed_json_is_one_line_naming_the_key(case):
    change, expected = BAD_JSON[case]
    with pytest.raises(UserError) as error:
        fill(zero2_with(change))
    assert str(error.value) == expected
    assert "\n" not in str(error.value)


def test_every_key_deepspeed_reads_is_known():
    """No false alarm: top-level keys DeepSpeed reads through any of its lookups are accepted."""
    config = zero2_with(
        lambda c: c.update(
            optimizer=AUTO_OPTIMIZER,
            scheduler=auto_scheduler(),
            activation_checkpointing={"partition_activations": False},
            flops_profiler={"enabled": False},
            aio={"block_size": 1048576},
            tensorboard={"enabled": False},
            csv_monitor={"enabled": False},
            comms_logger={"enabled": False},
            checkpoint={"tag_validation": "Warn"},
            data_types={"grad_accum_dtype": "fp32"},
            communication_data_type="fp32",
            prescale_gradients=False,
            memory_breakdown=False,
            zero_allow_untested_optimizer=True,
            zero_force_ds_cpu_optimizer=False,
            autotuning={"enabled": False},
            dump_state=False,
        )
    )
    filled = fill(config)
    assert set(autos(filled)) <= HIDDEN_SIZE_KEYS | {
        f"optimizer.params.{k}" for k in ("lr", "betas", "eps", "weight_decay")
    } | {
        f"scheduler.params.{k}" for k in ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps")
    } | {"scheduler.params.total_num_steps"}


def finetune(args: list[str], capsys) -> tuple[int, str]:
    recipe = load_recipe("finetune")

    sys.argv = ["finetune.py", *args]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main()
    return exit_info.value.code, capsys.readouterr().err


def test_bad_json_named_by_the_launch_file_stops_the_recipe_before_compute(
    smoke_assets, tmp_path, monkeypatch, capsys
):
    """In-process, with the environment accelerate launch sets for a DeepSpeed launch file."""
    path = tmp_path / "zero2_stage5.json"
    path.write_text(json.dumps(zero2_with(lambda c: c["zero_optimization"].update(stage=5))))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    out = tmp_path / "out"
    code, err = finetune(
        [
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            f"--data.train_file={smoke_assets['train']}",
            f"--output_dir={out}",
            "--train.max_steps=1",
            "--train.global_batch_size=4",
            "--train.micro_batch_size=2",
        ],
        capsys,
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("clustertune: error:")]
    assert lines == [
        f"clustertune: error: the DeepSpeed config '{path}': zero_optimization.stage=5 is "
        "invalid; use one of 0, 1, 2, 3."
    ], err
    assert "Traceback" not in err and "ZeRO-5" not in err
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- the configs users have (13)

TRAIN = TrainConfig(
    learning_rate=2e-4, warmup_steps=5, weight_decay=0.01, adam_beta2=0.98, adam_epsilon=1e-6
)


@pytest.mark.parametrize("guide", [GUIDE_ZERO2, GUIDE_ZERO3], ids=["zero2", "zero3"])
def test_transformers_guide_configs_fill_from_the_training_config(guide):
    from types import SimpleNamespace

    filled = fill(guide, dtype="bf16")
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    notes = fill_optimizer_autos(filled, TRAIN) + fill_scheduler_autos(filled, TRAIN, 120)
    fill_hidden_size_autos(filled, SimpleNamespace(d_model=64))
    assert autos(filled) == [], autos(filled)
    assert filled["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01},
    }  # ZeRO-Offload: DeepSpeed's CPU Adam builds on CPU, no torch_adam needed
    expected = {"warmup_min_lr": 0, "warmup_max_lr": 2e-4, "warmup_num_steps": 5}
    if guide["scheduler"]["type"] == "WarmupDecayLR":
        expected["total_num_steps"] = 120  # the run's steps, not divided by the world size
    assert filled["scheduler"]["params"] == expected
    assert any("replaces train.lr_schedule" in note for note in notes)
    assert any("logarithmically" in note for note in notes)
    assert autos(guide), "the user's JSON was modified in place"


def test_without_cuda_deepspeed_is_told_to_build_torch_adam():
    """DeepSpeed's `torch_adam` switch: torch.optim.AdamW with the JSON's values (its fused
    Adam cannot be built without CUDA); on a GPU the JSON stays as written."""
    import torch

    filled = fill(zero2_with(lambda c: c.update(optimizer=copy.deepcopy(AUTO_OPTIMIZER))))
    notes = fill_optimizer_autos(filled, TRAIN)
    if torch.cuda.is_available():
        assert "torch_adam" not in filled["optimizer"]["params"]
    else:
        assert filled["optimizer"]["params"]["torch_adam"] is True
        assert any("torch_adam=true" in note and "no CUDA" in note for note in notes)
        # a FusedAdam-only parameter cannot follow: refused rather than dropped
        fused_only = zero2_with(
            lambda c: c.update(optimizer={"type": "Adam", "params": {"bias_correction": False}})
        )
        with pytest.raises(UserError, match=r"no optimizer.params \['bias_correction'\]"):
            fill_optimizer_autos(fill(fused_only), TRAIN)


CONTRADICTIONS = {
    "lr": (
        ("optimizer", "lr", 3e-5),
        "sets optimizer.params.lr=3e-05 but the training config has train.learning_rate=0.0002",
    ),
    "betas": (
        ("optimizer", "betas", [0.9, 0.999]),
        "sets optimizer.params.betas=[0.9, 0.999] but the training config has "
        "train.adam_beta1=0.9, train.adam_beta2=0.98",
    ),
    "eps": (
        ("optimizer", "eps", 1e-8),
        "sets optimizer.params.eps=1e-08 but the training config has train.adam_epsilon=1e-06",
    ),
    "weight_decay": (
        ("optimizer", "weight_decay", 0.0),
        "sets optimizer.params.weight_decay=0.0 but the training config has "
        "train.weight_decay=0.01",
    ),
    "warmup_max_lr": (
        ("scheduler", "warmup_max_lr", 1e-3),
        "sets scheduler.params.warmup_max_lr=0.001 but the training config has "
        "train.learning_rate=0.0002",
    ),
    "warmup_num_steps": (
        ("scheduler", "warmup_num_steps", 100),
        "sets scheduler.params.warmup_num_steps=100 but the training config has "
        "train.warmup_steps=5",
    ),
    "total_num_steps": (
        ("scheduler", "total_num_steps", 1000),
        "sets scheduler.params.total_num_steps=1000 but the training config has 120 total steps "
        "(train.max_steps, or num_epochs x steps per epoch)",
    ),
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_explicit_value_contradicting_the_training_config_is_refused(case):
    (block, key, value), expected = CONTRADICTIONS[case]
    config = zero2_with(
        lambda c: c.update(optimizer=copy.deepcopy(AUTO_OPTIMIZER), scheduler=auto_scheduler())
    )
    config[block]["params"][key] = value
    filled = fill(config)
    with pytest.raises(UserError) as error:
        fill_optimizer_autos(filled, TRAIN)
        fill_scheduler_autos(filled, TRAIN, 120)
    assert str(error.value) == (
        f'{WHERE} {expected}; make them equal, or write "auto" to take the training value.'
    )


def test_explicit_values_that_agree_and_absent_ones_are_kept_or_filled():
    config = zero2_with(
        lambda c: c.update(
            optimizer={"type": "Adam", "params": {"lr": 2e-4, "betas": [0.9, 0.98]}},
            scheduler={"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-6}},
        )
    )
    filled = fill(config)
    fill_optimizer_autos(filled, TRAIN)
    fill_scheduler_autos(filled, TRAIN, 120)
    params = filled["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (
        2e-4,
        [0.9, 0.98],
        1e-6,  # absent: DeepSpeed's default would silently differ from train.adam_epsilon
        0.01,
    )
    assert filled["scheduler"]["params"] == {
        "warmup_min_lr": 1e-6,  # no training setting owns the start value: kept
        "warmup_max_lr": 2e-4,  # absent: WarmupDecayLR's own default peak is 1e-3
        "warmup_num_steps": 5,
        "total_num_steps": 120,
    }


def test_zero_warmup_steps_fill_the_positive_count_deepspeed_requires():
    filled = fill(zero2_with(lambda c: c.update(scheduler=auto_scheduler("WarmupLR"))))
    fill_scheduler_autos(filled, TrainConfig(warmup_steps=0), 10)
    assert filled["scheduler"]["params"]["warmup_num_steps"] == 1


def test_deepspeed_built_optimizer_keeps_no_decay_on_biases_and_norms(smoke_assets):
    from accelerate.utils import DummyOptim

    from clustertune.config import ModelConfig, PeftConfig
    from clustertune.modeling import build_model, load_model_config
    from clustertune.optim import build_optimizer

    model_cfg = ModelConfig(name_or_path=str(smoke_assets["tiny_t5"]))
    model = build_model(
        model_cfg, PeftConfig(method="none"), load_model_config(model_cfg.name_or_path)
    )
    optimizer = build_optimizer(model, TRAIN, {"optimizer": AUTO_OPTIMIZER})
    assert isinstance(optimizer, DummyOptim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.params
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert no_decay["params"] and all(
        "norm" in names[id(p)].lower() or "bias" in names[id(p)] for p in no_decay["params"]
    )
    assert not any("norm" in names[id(p)].lower() for p in decay["params"])


# ---------------------------------------------------------------- real 2-process runs

STEPS = 6
LAUNCH_TEMPLATE = yaml.safe_load((REPO / "launch" / "zero2.yaml").read_text())


def launch_file(tmp_path: Path, name: str, ds_config: dict) -> str:
    """A launch YAML like launch/zero2.yaml pointing at `ds_config`; returns the launch name
    launch_command expects (path without .yaml)."""
    (tmp_path / f"{name}.json").write_text(json.dumps(ds_config, indent=2))
    launch = copy.deepcopy(LAUNCH_TEMPLATE)
    launch["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / f"{name}.json")
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(launch))
    return str(tmp_path / name)


def run_args(assets, out: Path, **overrides) -> list[str]:
    values = {
        "model.name_or_path": assets["tiny_t5"],
        "data.train_file": assets["train"],
        "data.max_target_length": 64,
        "output_dir": out,
        "peft.method": "none",
        "model.dropout": 0.0,
        "train.max_steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        "train.learning_rate": 1e-3,
        "train.warmup_steps": 2,
        "train.weight_decay": 0.1,
        "train.log_every_steps": 1,
        "checkpoint.every_steps": 3,
    }
    values.update(overrides)
    return [f"--{key}={value}" for key, value in values.items()]


def records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.multiproc
def test_optimizer_block_trains_like_the_shipped_zero2(smoke_assets, tmp_path):
    """(a) DeepSpeed builds the JSON's AdamW (torch's on CPU) with train.* filled in: the same
    losses as our AdamW under the shipped zero2.json. The user config also goes through auto
    batch sizing, whose probe engines build the same optimizer."""
    shipped = tmp_path / "shipped"
    result = run(
        launch_command(
            "recipes/finetune.py", run_args(smoke_assets, shipped), launch="zero2", nproc=2
        )
    )
    assert result.returncode == 0, describe(result)

    user = tmp_path / "user"
    launch = launch_file(
        tmp_path, "user_optimizer", zero2_with(lambda c: c.update(optimizer=AUTO_OPTIMIZER))
    )
    args = run_args(
        smoke_assets,
        user,
        **{"train.micro_batch_size": "auto", "train.auto_batch_margin": 0.0},
    )
    # the probe may take 2 per micro-batch on both ranks: the same micro-batches as `shipped`
    result = run(
        launch_command("recipes/finetune.py", args, launch=launch, nproc=2),
        env=recipe_env(CLUSTERTUNE_TEST_OOM_ABOVE="2,2"),
    )
    assert result.returncode == 0, describe(result)
    assert "optimizer: AdamW as the DeepSpeed config names it, built by DeepSpeed" in result.stdout
    assert "optimizer.params.torch_adam=true" in result.stdout
    auto = next(
        json.loads(line)
        for line in (user / "metrics.jsonl").read_text().splitlines()
        if '"auto_batch"' in line
    )
    assert auto["chosen"] == 2 and auto["grad_accum_steps"] == 2, auto
    expected, actual = train_losses(shipped), train_losses(user)
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(actual[step] - expected[step]) <= 1e-5, (step, actual[step], expected[step])


def deepspeed_schedule(params: dict, steps: int) -> list[float]:
    """The learning rate after each optimizer step, from DeepSpeed's own WarmupDecayLR."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params["warmup_max_lr"])
    schedule = WarmupDecayLR(optimizer, **params)
    lrs = []
    for _ in range(steps):
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    return lrs


@pytest.mark.multiproc
def test_scheduler_block_is_deepspeeds_schedule_and_resumes_exactly(smoke_assets, tmp_path):
    """(b) WarmupDecayLR from the JSON, stepped by the engine only (no second schedule), its
    "auto"s from train.*; a resume from a checkpoint continues losses and lr exactly."""
    config = zero2_with(lambda c: c.update(optimizer=AUTO_OPTIMIZER, scheduler=auto_scheduler()))
    launch = launch_file(tmp_path, "user_schedule", config)
    out = tmp_path / "scheduled"
    result = run(
        launch_command("recipes/finetune.py", run_args(smoke_assets, out), launch=launch, nproc=2)
    )
    assert result.returncode == 0, describe(result)
    assert "schedule: DeepSpeed's WarmupDecayLR from the DeepSpeed config" in result.stdout
    assert "logarithmically" in result.stdout
    expected = deepspeed_schedule(
        {
            "warmup_min_lr": 0,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": 2,
            "total_num_steps": STEPS,
        },
        STEPS,
    )
    logged = records(out)
    assert [logged[s]["lr"] for s in range(1, STEPS + 1)] == pytest.approx(expected, abs=1e-12)
    assert logged[STEPS]["loss"] < logged[1]["loss"]

    resumed = tmp_path / "resumed"
    args = run_args(smoke_assets, resumed, resume=out / "checkpoints" / "step_3")
    result = run(launch_command("recipes/finetune.py", args, launch=launch, nproc=2))
    assert result.returncode == 0, describe(result)
    assert "resumed from" in result.stdout
    again = records(resumed)
    for step in range(4, STEPS + 1):
        assert abs(again[step]["loss"] - logged[step]["loss"]) <= 1e-6, (step, again, logged)
        assert again[step]["lr"] == pytest.approx(logged[step]["lr"], abs=1e-12)


@pytest.mark.multiproc
def test_bad_json_exits_2_with_one_line_before_compute(smoke_assets, tmp_path):
    """(c) Under a real 2-process DeepSpeed launch."""
    config = zero2_with(lambda c: c["zero_optimization"].update(overlap_comms=True))
    launch = launch_file(tmp_path, "typo", config)
    out = tmp_path / "typo-run"
    result = run(
        launch_command("recipes/finetune.py", run_args(smoke_assets, out), launch=launch, nproc=2)
    )
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if "clustertune: error:" in line]
    assert errors == [
        f"clustertune: error: the DeepSpeed config '{tmp_path / 'typo.json'}' has an unknown key "
        "'zero_optimization.overlap_comms'; did you mean 'zero_optimization.overlap_comm'?"
    ], describe(result)
    assert "Traceback" not in result.stderr and "ZeRO-" not in result.stdout
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


def test_contradiction_can_be_checked_before_the_run_length_is_known():
    from clustertune.deepspeed_config import check_optimizer_and_scheduler

    config = zero2_with(
        lambda c: c.update(optimizer=copy.deepcopy(AUTO_OPTIMIZER), scheduler=auto_scheduler())
    )
    check_optimizer_and_scheduler(config, TRAIN)  # "auto" everywhere: nothing to refuse
    assert autos(config["optimizer"]), "the template was modified in place"
    config["optimizer"]["params"]["lr"] = 3e-5
    with pytest.raises(UserError, match=r"optimizer.params.lr=3e-05 .* train.learning_rate=0.0002"):
        check_optimizer_and_scheduler(config, TRAIN)
    check_optimizer_and_scheduler(None, TRAIN)  # not a DeepSpeed launch
