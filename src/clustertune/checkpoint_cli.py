"""clustertune-checkpoint: a training checkpoint in the forms other tools read.

    clustertune-checkpoint convert outputs/run/checkpoints/step_600 /shared/step_600_universal
    clustertune-checkpoint consolidate outputs/run/checkpoints/step_600 outputs/step_600_model

`convert` writes DeepSpeed's universal checkpoint of a ZeRO checkpoint (what a resume on another
world size loads, reshard.py): a DeepSpeed engine built with "checkpoint": {"load_universal":
true} loads it on any number of ranks with `engine.load_checkpoint(DEST, tag="engine")`. Given
the checkpoint's own universal/ folder as DEST it fills the cache a resume would otherwise make.

`consolidate` writes the trained weights in fp32 as a Hugging Face folder: the whole model
(`AutoModelForSeq2SeqLM.from_pretrained(DEST)`) after full fine-tuning, the LoRA adapter
(`PeftModel.from_pretrained(base, DEST)`) after LoRA, each with the tokenizer. ZeRO partitions
are gathered by DeepSpeed's zero_to_fp32 (get_fp32_state_dict_from_zero_checkpoint); a DDP
checkpoint already holds them whole. Weights only: the optimizer state stays in the checkpoint.

Both read only a checkpoint whose files verify against its COMPLETE.json, and write only to a
new folder outside every run's checkpoints and final/ (which a run prunes or replaces); the one
exception is `convert` into the checkpoint's own universal/ cache.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clustertune.atomicio import write_json_atomic
from clustertune.errors import UserError, exit_on_user_error
from clustertune.reshard import convert_to_universal, saved_layout
from clustertune.run_folder import (
    CHECKPOINT_MARKER,
    DEEPSPEED_TAG,
    FSDP_TAG,
    TRAINABLE_FILE,
    TRAINER_STATE,
    UNIVERSAL_DIR,
    UNIVERSAL_MARKER,
    checkpoint_damage,
    inside_run_part,
)

CONSOLIDATED_MARKER = "clustertune_consolidated.json"


def _checked_checkpoint(path: Path) -> Path:
    if not (path / CHECKPOINT_MARKER).is_file() or not (path / TRAINER_STATE).is_file():
        raise UserError(
            f"'{path}' is not a complete clustertune checkpoint (no {CHECKPOINT_MARKER} or "
            f"{TRAINER_STATE}); give an output_dir/checkpoints/step_N folder."
        )
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UserError(
            f"the checkpoint in {path} is damaged ({damage}); give another checkpoints/step_N."
        )
    return path


def _free_destination(dest: Path) -> None:
    """A new folder, outside every part of a training run that the run prunes or replaces."""
    if dest.exists():
        raise UserError(f"destination '{dest}' already exists; give a new folder.")
    where = inside_run_part(dest)
    if where is not None:
        raise UserError(
            f"destination '{dest}' is {where}, which the run prunes or replaces; give a "
            "folder outside the run's checkpoints/ and final/, e.g. beside the run folder."
        )


def convert(checkpoint: Path, dest: Path, workers: int) -> str:
    checkpoint = _checked_checkpoint(checkpoint)
    own_cache = dest.resolve() == (checkpoint / UNIVERSAL_DIR).resolve()
    if not own_cache and not (dest.exists() and (dest / UNIVERSAL_MARKER).is_file()):
        _free_destination(dest)
    saved = saved_layout(checkpoint)
    if saved.is_fsdp:
        raise UserError(
            f"the checkpoint in {checkpoint} was made by FSDP2: torch.distributed.checkpoint "
            "reshards it as it loads on any world size, so it needs no conversion; "
            "`consolidate` writes its weights."
        )
    if not saved.is_deepspeed:
        raise UserError(
            f"the checkpoint in {checkpoint} was made by {saved.label}: it holds the whole state "
            "in one file and resumes on any world size as it is; `consolidate` writes its weights."
        )
    result = convert_to_universal(checkpoint, dest, workers=workers)
    done = "converted" if result.converted_now else "already converted"
    return (
        f"{done}: {checkpoint} ({saved.label}, {saved.world_size} rank(s)) -> {result.folder} "
        f"(DeepSpeed universal checkpoint, tag '{DEEPSPEED_TAG}', {result.size_bytes / 2**20:.1f} "
        f"MiB, {result.seconds:.1f} s)"
    )


def trained_state_dict(checkpoint: Path) -> dict[str, Any]:
    """fp32 tensors of the trained parameters, by the model's parameter names."""
    saved = saved_layout(checkpoint)
    if saved.is_fsdp:  # every rank's shard, put together (the whole model's weights)
        from clustertune.fsdp import read_full_state

        return read_full_state(checkpoint / FSDP_TAG)["model"]
    if not saved.is_deepspeed:
        from safetensors.torch import load_file

        return load_file(str(checkpoint / TRAINABLE_FILE))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per parameter group
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)


def consolidate(checkpoint: Path, dest: Path) -> str:
    """The checkpoint's model as save_pretrained writes it, in fp32, written atomically."""
    from clustertune.chat import resolve_chat_template
    from clustertune.config import ModelConfig, PeftConfig
    from clustertune.export import replace_folder, save_pretrained_verified
    from clustertune.modeling import build_model, load_model_config, load_tokenizer

    checkpoint = _checked_checkpoint(checkpoint)
    _free_destination(dest)
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    # the parameters' identity is the checkpoint's own fingerprint (config.yaml describes the
    # last launch into the folder, which may have been refused)
    identity = state["fingerprint"]
    name = identity["model.name_or_path"]
    peft = PeftConfig(
        method=identity["peft.method"],
        r=identity["peft.r"],
        alpha=identity["peft.alpha"],
        target_modules=list(identity["peft.target_modules"]),
    )
    # the tokenizer the run trained with: its data.chat_template (which may have added tokens,
    # so the embeddings are sized to it) saved beside the weights, as final/ has it
    tokenizer = load_tokenizer(name)
    resolve_chat_template(tokenizer, identity.get("data.chat_template") or "")
    model = build_model(
        ModelConfig(name_or_path=name), peft, load_model_config(name), len(tokenizer)
    )
    trained = trained_state_dict(checkpoint)
    result = model.load_state_dict(trained, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    not_restored = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or not_restored:
        raise RuntimeError(
            f"{checkpoint} does not match {name} with peft.method={peft.method}: unexpected "
            f"{result.unexpected_keys[:4]}, trained parameters missing {not_restored[:4]}"
        )
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_pretrained_verified(model, model.state_dict(), tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(
        tmp / CONSOLIDATED_MARKER,
        {"source": str(checkpoint), "step": state["step"], "base_model": name, **identity},
    )
    replace_folder(tmp, dest)
    what = "LoRA adapter" if peft.method == "lora" else "model"
    return f"{what} of {checkpoint} (step {state['step']}, fp32) written to {dest}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustertune-checkpoint", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_universal = commands.add_parser(
        "convert", help="DeepSpeed universal checkpoint of a ZeRO checkpoint (any world size)"
    )
    to_universal.add_argument("checkpoint", type=Path, help="an output_dir/checkpoints/step_N")
    to_universal.add_argument("dest", type=Path, help="a new folder")
    to_universal.add_argument(
        "--workers", type=int, default=4, help="processes extracting and merging shards"
    )
    to_weights = commands.add_parser(
        "consolidate", help="fp32 weights as a Hugging Face model or LoRA adapter folder"
    )
    to_weights.add_argument("checkpoint", type=Path, help="an output_dir/checkpoints/step_N")
    to_weights.add_argument("dest", type=Path, help="a new folder")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    import clustertune.quiet  # noqa: F401  (silences known-harmless library warnings)

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "convert":
        print(convert(args.checkpoint, args.dest, max(1, args.workers)), flush=True)
    else:
        print(consolidate(args.checkpoint, args.dest), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
