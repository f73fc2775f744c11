"""Config loading: every shipped YAML, overrides, unknown keys, --help, resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from clustertune.config import FinetuneConfig, config_to_yaml, parse_config, write_resolved_config
from clustertune.errors import UserError

FINETUNE_CONFIGS = sorted(
    p
    for p in (REPO / "recipes" / "configs").rglob("*.yaml")
    if p.stem in ("full", "lora") or p.stem.endswith(("_lora", "_full"))
)


def test_there_are_finetune_configs():
    assert {p.parent.name + "/" + p.stem for p in FINETUNE_CONFIGS} >= {
        "smoke/full",
        "smoke/lora",
        "flan_t5_base/full",
        "flan_t5_base/lora",
        "qwen3_0_6b/full",
        "qwen3_0_6b/lora",
        "smoke/agent_lora",
    }


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path: Path):
    cfg = parse_config(FinetuneConfig, ["--config", str(path)])
    assert cfg.peft.method == ("none" if path.stem.endswith("full") else "lora")
    first_lines = path.read_text().splitlines()[:6]
    assert any("recipes/finetune.py" in line for line in first_lines), (
        "YAML must open with the command that runs it"
    )


def test_overrides_win_over_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "train:\n  learning_rate: 0.5\n  micro_batch_size: 2\npeft:\n  method: lora\n"
    )
    cfg = parse_config(
        FinetuneConfig,
        ["--config", str(config), "--train.learning_rate=0.25", "--peft.target_modules=[q,k]"],
    )
    assert cfg.train.learning_rate == 0.25 and cfg.train.micro_batch_size == 2
    assert cfg.peft.method == "lora" and cfg.peft.target_modules == ["q", "k"]


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  learnig_rate: 0.5\n")
    with pytest.raises(
        UserError,
        match=r"unknown config key 'train.learnig_rate'.*did you mean 'train.learning_rate'",
    ):
        parse_config(FinetuneConfig, ["--config", str(config)])


def test_unknown_cli_key_suggests_nearest():
    with pytest.raises(UserError, match=r"'peft.rank'.*did you mean 'peft.r'"):
        parse_config(FinetuneConfig, ["--peft.rank=8"])


def test_bad_value_type_is_a_user_error():
    with pytest.raises(UserError, match="invalid"):
        parse_config(FinetuneConfig, ["--train.global_batch_size=many"])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(FinetuneConfig, ["--seed=7", "--data.max_source_length=64"])
    write_resolved_config(cfg, tmp_path / "config.yaml", header="# header\n")
    again = parse_config(FinetuneConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 7
    assert config_to_yaml(again) == config_to_yaml(cfg)


def test_help_lists_every_key_with_default():
    out = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "finetune.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for key in (
        "output_dir",
        "model.name_or_path",
        "model.dropout",
        "data.prompt_template",
        "train.global_batch_size",
        "peft.target_modules",
        "checkpoint.keep_last",
        "resume",
    ):
        assert f"--{key}" in out.stdout
    assert "(default: 32)" in out.stdout  # global_batch_size


def test_string_values_with_yaml_syntax_stay_strings():
    cfg = parse_config(
        FinetuneConfig,
        [
            "--data.prompt_template=Dialogue: {dialogue}",
            "--output_dir",
            "runs/a: b",
            "--data.eval_file=null",
        ],
    )
    assert cfg.data.prompt_template == "Dialogue: {dialogue}" and cfg.output_dir == "runs/a: b"
    assert cfg.data.eval_file is None
