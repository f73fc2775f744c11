"""A run moving between engines: a ZeRO checkpoint continued under FSDP2, and an FSDP2
checkpoint under ZeRO, exactly (the same weights, Adam moments and step counts), through the
two libraries' own exchange formats, never a re-write of either's shard layout.

- ZeRO -> FSDP2: DeepSpeed's universal form of the checkpoint (reshard.py converts it once,
  cached in step_N/universal/) holds every parameter whole, one folder each:
  zero/<name>/fp32.pt (the fp32 master), exp_avg.pt, exp_avg_sq.pt and step.pt for the
  trained ones. They become full state dicts keyed by the parameter names (the names
  DeepSpeed and FSDP2 both use: the model's own), which torch's set_state_dict cuts into
  this launch's shards (`load_universal_into_fsdp`).
- FSDP2 -> ZeRO: the launch's own, freshly built engine saves a checkpoint of itself and
  DeepSpeed's converter makes its universal form: the layout DeepSpeed will read, with every
  file it expects; each parameter's fp32.pt, exp_avg.pt, exp_avg_sq.pt and step.pt, and the
  module weights in its model states, are then replaced by the DCP checkpoint's values
  (`fsdp_to_universal`), and the engine loads that universal checkpoint as it loads any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PARAM_KEY = "param"  # deepspeed.checkpoint.constants.PARAM: the tensor inside fp32.pt etc.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _read(path: Path) -> Any:
    return torch.load(path, weights_only=False, map_location="cpu")


def load_universal_into_fsdp(universal_engine: Path, model: Any, optimizer: Any) -> None:
    """Collective: every rank reads the whole parameters and moments (one file each) and keeps
    its shard of them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # the same full dicts on every rank (with cpu_offload only rank 0 would get them, and the
    # ranks' collectives would no longer pair up)
    full = StateDictOptions(full_state_dict=True)
    zero = universal_engine / "zero"
    model_state = {}
    for name, _ in model.named_parameters():  # buffers: built by the model, in no checkpoint
        folder = zero / name
        if not (folder / "fp32.pt").is_file():
            raise RuntimeError(f"the universal checkpoint {universal_engine} has no {name}")
        model_state[name] = _read(folder / "fp32.pt")[PARAM_KEY]
    set_model_state_dict(
        model, model_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
    state = {}
    for group in optimizer_state["param_groups"]:
        for name in group["params"]:
            folder = zero / name
            step = _read(folder / "step.pt")
            state[name] = {
                "step": torch.as_tensor(step, dtype=torch.float32),
                **{key: _read(folder / f"{key}.pt")[PARAM_KEY] for key in MOMENTS},
            }
    optimizer_state["state"] = state
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
    )
