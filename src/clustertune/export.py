"""Writing final/ so that the standard Hugging Face calls load it, and checking it did."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from clustertune.modeling import is_peft_model


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
