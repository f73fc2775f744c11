"""Writing final/ so that the standard Hugging Face calls load it, and checking it did."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from clustertune.atomicio import write_json_atomic
from clustertune.fsdp import full_model_state, is_sharded
from clustertune.modeling import is_peft_model
from clustertune.run_folder import FINAL_MARKER, RunFolder
from clustertune.storage import fill_disk_for_test, reported_write_failures

MERGED_DIR = "merged"  # final/merged/: the LoRA adapter merged into its base (merge_on_save)


def write_final(
    run: RunFolder,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    marker: dict[str, Any],
    *,
    merge: bool,
    rerun_hint: Callable[[], str],
) -> Path:
    """Collective (every rank gathers the state dict; the main process writes). Everything goes
    into .final.tmp/ with the marker last, then replaces final/ (`replace_folder`). A write
    that fails for the disk or the permissions is one line; .final.tmp/ is removed and final/
    (if any) is as it was."""
    final, tmp = run.final, run.final_tmp
    is_main = accelerator.is_main_process
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Collective: under ZeRO-3 every rank takes part in gathering the 16-bit weights, under
    # FSDP2 in gathering every shard.
    state_dict = full_model_state(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if is_main:

        def consequence() -> str:
            kept = f"{final} is as it was" if final.exists() else f"no {final} was written"
            return f"{tmp} was removed and {kept}; {rerun_hint()}"

        with reported_write_failures(tmp, consequence, cleanup=tmp):
            tmp.mkdir(parents=True)
            fill_disk_for_test("final")
            unwrapped = accelerator.unwrap_model(model)
            # gradient checkpointing turned the KV cache off for training; generation wants it
            unwrapped.config.use_cache = True
            save_pretrained_verified(unwrapped, state_dict, tmp)
            tokenizer.save_pretrained(tmp)
            if merge:
                merge_adapter(tmp, tmp / MERGED_DIR)
            write_json_atomic(tmp / FINAL_MARKER, marker)
            replace_folder(tmp, final)
        print(f"final model written to {final}", flush=True)
    accelerator.wait_for_everyone()
    return final


def save_pretrained_verified(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """save_pretrained from an already gathered state dict (ZeRO-3: the 16-bit gather).

    A LoRA adapter is re-read from disk and compared tensor by tensor with the trained
    one: ZeRO-3 + LoRA has been seen to write empty 40-byte adapters (trl #4416, peft #2892).
    """
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if not is_peft_model(model):
        return
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model, state_dict=state_dict)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    if not expected or set(saved) != set(expected):
        raise RuntimeError(
            f"the saved adapter in {folder} has {len(saved)} tensors, expected {len(expected)} "
            f"({sorted(set(expected) ^ set(saved))[:4]}...); refusing to publish it as final/."
        )
    for name, tensor in expected.items():
        if (
            saved[name].shape != tensor.shape
            or saved[name].numel() == 0
            or not torch.equal(saved[name].to(tensor.dtype).cpu(), tensor.cpu())
        ):
            raise RuntimeError(
                f"adapter tensor {name} in {folder} differs from the trained one after saving."
            )


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Base model + adapter merged into plain weights, written atomically beside the adapter."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig
    from transformers import AutoConfig, AutoTokenizer

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    is_seq2seq = getattr(AutoConfig.from_pretrained(base), "is_encoder_decoder", False)
    auto = AutoPeftModelForSeq2SeqLM if is_seq2seq else AutoPeftModelForCausalLM
    merged = auto.from_pretrained(str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def replace_folder(new: Path, final: Path) -> None:
    """Put the complete folder `new` in place of `final`; the previous `final` is kept (as
    .<name>.old next to it) until the new one is in place, so a kill never leaves neither."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
