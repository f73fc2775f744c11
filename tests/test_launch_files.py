"""Every shipped accelerate launch file and DeepSpeed config loads and completes.

Each `launch/*.yaml` is parsed (by YAML and by accelerate's own loader, which rejects unknown
keys); a DeepSpeed launch file's `deepspeed_config_file` is resolved from the repository root,
as the recipes run there, and filled the way the recipe fills it, with realistic values: no
"auto" may be left once the training settings and the model width are known. And no
`ds_configs/*.json` is orphaned: some launch file points at each.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml
from helpers import REPO

from clustertune.deepspeed_config import (
    HIDDEN_SIZE_KEYS,
    fill_deepspeed_config,
    fill_hidden_size_autos,
    load_deepspeed_json,
    offloads_optimizer,
    zero_stage,
)

LAUNCH_FILES = sorted((REPO / "launch").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))

# launch file -> (distributed_type, num_processes, DeepSpeed JSON, ZeRO stage, CPU offload)
EXPECTED = {
    "ddp": ("MULTI_GPU", 8, None, 0, False),
    "single_gpu": ("NO", 1, None, 0, False),
    "zero1": ("DEEPSPEED", 8, "ds_configs/zero1.json", 1, False),
    "zero2": ("DEEPSPEED", 8, "ds_configs/zero2.json", 2, False),
    "zero3": ("DEEPSPEED", 8, "ds_configs/zero3.json", 3, False),
    "zero3_offload": ("DEEPSPEED", 8, "ds_configs/zero3_offload.json", 3, True),
    "fsdp2": ("FSDP", 8, None, 0, False),
    "fsdp2_offload": ("FSDP", 8, None, 0, True),
}

# One 8-GPU node, flan-t5-base width: micro 4 x accumulation 2 x 8 ranks = 64 per step.
MICRO, ACCUM, WORLD, CLIP, D_MODEL = 4, 2, 8, 0.5, 768


def launch_text(name: str) -> str:
    return (REPO / "launch" / f"{name}.yaml").read_text()


def _launch(name: str) -> dict:
    return yaml.safe_load(launch_text(name))


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def test_every_launch_file_is_covered():
    assert LAUNCH_FILES and sorted(path.stem for path in LAUNCH_FILES) == sorted(EXPECTED)
    assert DS_CONFIGS, "no ds_configs/*.json found"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_file_parses_with_expected_shape(name):
    from accelerate.commands.config.config_args import load_config_from_file

    distributed_type, num_processes, ds_file, _, _ = EXPECTED[name]
    launch = _launch(name)
    # 'NO' must be quoted: bare NO is YAML 1.1 for False
    assert launch["distributed_type"] == distributed_type, launch
    assert launch["num_processes"] == num_processes and launch["num_machines"] == 1, launch
    assert launch.get("deepspeed_config", {}).get("deepspeed_config_file") == ds_file, launch

    # accelerate's own loader: unknown keys are an error there, and the enum must convert
    accelerate_config = load_config_from_file(str(REPO / "launch" / f"{name}.yaml"))
    assert accelerate_config.distributed_type.value == distributed_type
    assert accelerate_config.num_processes == num_processes

    # the usage line in the header names this very file and a training config that exists
    usage = re.search(
        r"--config_file (\S+).*recipes/finetune\.py --config (\S+)", launch_text(name)
    )
    assert usage, f"launch/{name}.yaml has no usage line"
    assert usage.group(1) == f"launch/{name}.yaml"
    assert (REPO / usage.group(2)).is_file(), usage.group(2)


DEEPSPEED_LAUNCHES = [name for name, expected in sorted(EXPECTED.items()) if expected[2]]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("name", DEEPSPEED_LAUNCHES)
def test_deepspeed_config_of_launch_file_fills_completely(name, dtype):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    _, _, ds_file, stage, offload = EXPECTED[name]
    launch = _launch(name)
    ds_path = REPO / launch["deepspeed_config"]["deepspeed_config_file"]
    assert ds_path.is_file(), f"launch/{name}.yaml points at missing {ds_path}"
    raw = load_deepspeed_json(str(ds_path))
    # the training config owns these: the JSON must leave them to it, not repeat a value
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
    ):
        assert raw[key] == "auto", (ds_file, key, raw[key])
    assert zero_stage(raw) == stage and offloads_optimizer(raw) == offload
    assert launch["deepspeed_config"]["zero3_init_flag"] == (stage == 3), launch

    filled = fill_deepspeed_config(
        raw,
        micro_batch_size=MICRO,
        grad_accum_steps=ACCUM,
        world_size=WORLD,
        max_grad_norm=CLIP,
        dtype=dtype,
    )
    assert filled["train_micro_batch_size_per_gpu"] == MICRO
    assert filled["gradient_accumulation_steps"] == ACCUM
    assert filled["train_batch_size"] == MICRO * ACCUM * WORLD == 64
    assert filled["gradient_clipping"] == CLIP
    assert filled["bf16"]["enabled"] is (dtype == "bf16")
    assert filled["fp16"]["enabled"] is (dtype == "fp16")
    assert set(_autos(filled)) <= HIDDEN_SIZE_KEYS, _autos(filled)  # left for the model width
    assert _autos(raw), "the raw config was modified in place"

    complete = fill_hidden_size_autos(filled, SimpleNamespace(d_model=D_MODEL))
    assert _autos(complete) == [], _autos(complete)
    zero = complete["zero_optimization"]
    assert zero["reduce_bucket_size"] == D_MODEL * D_MODEL
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * D_MODEL * D_MODEL)
        assert zero["stage3_param_persistence_threshold"] == 10 * D_MODEL
    # DeepSpeed's own schema for the ZeRO section accepts it (it forbids unknown keys)
    assert DeepSpeedZeroConfig(**zero).stage == stage


FSDP_PROBE = """
import dataclasses, json
from clustertune.fsdp import fsdp_settings
print(json.dumps(dataclasses.asdict(fsdp_settings())))
"""

# An FSDP launch file as a user may write it: keys without the fsdp_ prefix (accelerate adds
# it), FSDP1, bf16, two wrapped classes, booleans the other way round from launch/fsdp2.yaml.
USER_WRITTEN_FSDP = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "mixed_precision": "bf16",
    "num_machines": 1,
    "num_processes": 1,
    "fsdp_config": {
        "version": 1,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "T5Block,LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": False,
        "offload_params": True,
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": True,
    },
}


@pytest.mark.parametrize(
    "name",
    [name for name, e in sorted(EXPECTED.items()) if e[0] == "FSDP"]
    + ["user-written", "user-written-list"],
)
def test_fsdp_launch_files_reach_the_processes_as_clustertune_reads_them(name, tmp_path):
    """The settings `accelerate launch` exports from the file, read back in the process by
    clustertune, are those clustertune-submit reads from the file itself
    (fsdp.launch_file_settings); the shipped files are a valid FSDP2 setup for a T5 and a
    Llama."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, T5Config

    from clustertune.fsdp import FSDPSettings, check_fsdp_settings, launch_file_settings

    path = REPO / "launch" / f"{name}.yaml"
    if name.startswith("user-written"):
        launch = yaml.safe_load(yaml.safe_dump(USER_WRITTEN_FSDP))
        if name == "user-written-list":  # a YAML list reaches the processes as "['A', 'B']"
            launch["fsdp_config"]["transformer_layer_cls_to_wrap"] = [
                "T5Block",
                "LlamaDecoderLayer",
            ]
        path = tmp_path / "fsdp.yaml"
        path.write_text(yaml.safe_dump(launch))
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(path),
        "--num_processes",
        "1",
        str(probe),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    in_process = FSDPSettings(**{**read, "wrap_classes": tuple(read["wrap_classes"])})
    assert launch_file_settings(yaml.safe_load(path.read_text())) == in_process
    if name.startswith("user-written"):
        assert in_process.wrap_classes == ("T5Block", "LlamaDecoderLayer")
        assert (in_process.version, in_process.mixed_precision) == (1, "bf16")
        return
    for model_config in (T5Config(), LlamaConfig()):
        check_fsdp_settings(in_process, "fp32", model_config)
    assert (in_process.version, in_process.offload_params) == (2, EXPECTED[name][4])


@pytest.mark.parametrize("ds_config", DS_CONFIGS, ids=lambda path: path.name)
def test_every_deepspeed_config_is_used_by_a_launch_file(ds_config):
    used = {
        (REPO / launch["deepspeed_config"]["deepspeed_config_file"]).resolve()
        for launch in map(_launch, EXPECTED)
        if "deepspeed_config" in launch
    }
    assert ds_config.resolve() in used, f"no launch/*.yaml points at ds_configs/{ds_config.name}"
