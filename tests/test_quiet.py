"""Quiet by default: a user error is one line under every launcher, and the library warnings
known to be harmless (clustertune.quiet) are gone while the ones that could matter remain."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
from helpers import describe, launch_command, run

from clustertune import quiet

ERROR_PREFIX = "clustertune: error: "

# What each silenced warning looks like on a terminal (see the `make smoke` log in issue 12).
SILENCED = (
    "will NOT tie",
    "Setting accelerator to CPU",
    "`is_gradient_checkpointing` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "Input and output embeddings are no longer tied after merging",
)


def user_error_args(smoke_assets, tmp_path) -> list[str]:
    """Refused on every rank before compute: 5 is not a multiple of 2 x 2."""
    return [
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--output_dir={tmp_path / 'out'}",
        "--train.max_steps=1",
        "--train.global_batch_size=5",
        "--train.micro_batch_size=2",
    ]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


# ---------------------------------------------------------------------------------------
# A user error under a multi-process launch
# ---------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_user_error_is_printed_once_under_plain_accelerate_launch(smoke_assets, tmp_path):
    command = launch_command(
        "recipes/finetune.py",
        user_error_args(smoke_assets, tmp_path),
        launch="ddp",
        nproc=2,
        wrapper=False,
    )
    result = run(command)
    assert result.returncode != 0, describe(result)  # torchrun's code (1), see README
    lines = error_lines(result.stderr)
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith(f"{ERROR_PREFIX}train.global_batch_size=5"), describe(result)


@pytest.mark.multiproc
def test_clustertune_launch_shows_only_the_line_and_exits_2(smoke_assets, tmp_path):
    command = launch_command(
        "recipes/finetune.py", user_error_args(smoke_assets, tmp_path), launch="ddp", nproc=2
    )
    result = run(command)
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ERROR_PREFIX}train.global_batch_size=5"), (
        describe(result)
    )
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.multiproc
def test_an_error_only_another_rank_sees_is_still_reported_once(tmp_path):
    """The main process does not fail: the rank that does reports after its grace time."""
    script = tmp_path / "rank1_only.py"
    script.write_text(
        "import os, sys, time\n"
        "from clustertune.errors import UserError, exit_on_user_error\n"
        "@exit_on_user_error\n"
        "def main():\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise UserError('rank 1 cannot read its shard')\n"
        "    time.sleep(60)  # the main process would go on; torchrun ends it\n"
        "sys.exit(main())\n"
    )
    result = run(launch_command(str(script), [], launch="ddp", nproc=2))
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines() == [f"{ERROR_PREFIX}rank 1 cannot read its shard"]


# ---------------------------------------------------------------------------------------
# Harmless library warnings are gone, real ones stay
# ---------------------------------------------------------------------------------------


def test_short_zero2_lora_run_prints_none_of_the_silenced_warnings(smoke_assets, tmp_path):
    args = [
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--output_dir={tmp_path / 'out'}",
        "--train.max_steps=2",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=4",
        "--peft.method=lora",
        "--peft.target_modules=[q,v]",
    ]
    result = run(launch_command("recipes/finetune.py", args, launch="zero2", nproc=1))
    assert result.returncode == 0, describe(result)
    output = result.stdout + result.stderr
    assert [text for text in SILENCED if text in output] == [], describe(result)
    assert "ZeRO-2" in result.stdout  # the project's own lines are still there


class Captured(logging.Handler):
    """The records a logger passes on (after its filters), as text."""

    def __init__(self, logger_name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(logger_name)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Captured:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def test_untied_t5_head_is_quiet_but_a_config_that_disagrees_with_its_weights_is_not(
    smoke_assets, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    quiet.install()
    # The smoke T5 says what its weights are (its own lm_head) ...
    config = json.loads((smoke_assets["tiny_t5"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with Captured("transformers.modeling_utils") as t5_log:
        AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
    assert not [m for m in t5_log.messages if "will NOT tie" in m]

    # ... a Llama whose config claims tied embeddings over an untied checkpoint is a real
    # mismatch, and transformers' warning about it still shows.
    mismatched = tmp_path / "tied-claim"
    shutil.copytree(smoke_assets["tiny_causal"], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with Captured("transformers.modeling_utils") as llama_log:
        AutoModelForCausalLM.from_pretrained(mismatched)
    assert [m for m in llama_log.messages if "will NOT tie" in m and "embed_tokens" in m]


def test_harmless_library_warnings_are_ignored_and_others_are_not(smoke_assets):
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no once-per-location: a repeat must show too
        quiet.install()  # in front of "always"
        assert model.is_gradient_checkpointing is False  # what peft asks
        get_peft_model(model, LoraConfig(target_modules=["q"])).merge_and_unload()
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            try:
                gathered = torch.empty(3)
                dist.all_gather_into_tensor(gathered, torch.ones(3))  # as DeepSpeed ZeRO does
            finally:
                dist.destroy_process_group()
        warnings.warn("a FutureWarning nobody vetted", FutureWarning, stacklevel=1)
        warnings.warn("a UserWarning nobody vetted", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert [text for text in SILENCED if any(text in m for m in messages)] == [], messages
    assert "a FutureWarning nobody vetted" in messages and "a UserWarning nobody vetted" in messages


def test_deepspeed_cpu_note_stays_where_an_accelerator_device_exists(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU here and never falls back to the CPU")
    import deepspeed.accelerator.real_accelerator as real_accelerator

    quiet.install()

    def detect() -> list[str]:
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect afresh
        with Captured("DeepSpeed") as log:
            real_accelerator.get_accelerator()
        return [m for m in log.messages if m.startswith(quiet.DEEPSPEED_CPU_FALLBACK)]

    monkeypatch.setattr(quiet, "ACCELERATOR_DEVICE_NODES", (str(tmp_path / "no-such-device"),))
    assert detect() == []  # no accelerator on this machine: CPU is simply the truth
    device_node = tmp_path / "nvidiactl"
    device_node.touch()
    monkeypatch.setattr(quiet, "ACCELERATOR_DEVICE_NODES", (str(device_node),))
    assert len(detect()) == 1  # a device DeepSpeed could not use: the warning is the hint
