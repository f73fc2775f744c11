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
    shapes = {name: parameter.shape for name, parameter in model.named_parameters()}

    def whole(path: Path, name: str) -> torch.Tensor:
        # ZeRO-1/2 write {"param": tensor, "cat_dim": ...}; ZeRO-3 the flat tensor alone
        saved = _read(path)
        tensor = saved[PARAM_KEY] if isinstance(saved, dict) else saved
        return tensor.reshape(shapes[name])

    model_state = {}
    for name in shapes:  # buffers: built by the model, in no checkpoint
        folder = zero / name
        if not (folder / "fp32.pt").is_file():
            raise RuntimeError(f"the universal checkpoint {universal_engine} has no {name}")
        model_state[name] = whole(folder / "fp32.pt", name)
    set_model_state_dict(
        model, model_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
    global_step = _zero3_step(zero)
    state = {}
    for group in optimizer_state["param_groups"]:
        for name in group["params"]:
            folder = zero / name
            step = _read(folder / "step.pt") if (folder / "step.pt").is_file() else global_step
            state[name] = {
                "step": torch.as_tensor(step, dtype=torch.float32),
                **{key: whole(folder / f"{key}.pt", name) for key in MOMENTS},
            }
    optimizer_state["state"] = state
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
    )


def _zero3_step(zero: Path) -> Any:
    """ZeRO-3's universal form keeps Adam's step in zero/optimizer_state.pt, one per group
    (all the same: every parameter steps every time), not beside each parameter."""
    path = zero / "optimizer_state.pt"
    if not path.is_file():
        return None
    groups = _read(path).get("optimizer_state_dict", {}).get("state", {})
    steps = {float(entry["step"]) for entry in groups.values() if "step" in entry}
    if len(steps) > 1:
        raise RuntimeError(f"{path} holds different step counts per group: {sorted(steps)}")
    return steps.pop() if steps else None


def _write_param(path: Path, tensor: torch.Tensor, like: Path) -> None:
    """One universal file holding `tensor`, with the fields DeepSpeed wrote beside the fp32
    master in `like` (its cat_dim and the like): a fresh engine's save has no Adam moments
    yet, so their files are made after the master's."""
    saved = _read(like)
    if isinstance(saved, dict):
        shape = saved[PARAM_KEY].shape
        saved = {**saved, PARAM_KEY: tensor.detach().float().reshape(shape).clone()}
    else:
        saved = tensor.detach().float().clone()
    torch.save(saved, path)


def _fill_from_dcp(universal_engine: Path, dcp_folder: Path) -> int:
    """Put a DCP checkpoint's whole parameters and Adam state into a universal checkpoint of
    the same model, file by file; returns how many parameters were written."""
    from clustertune.fsdp import read_full_state

    state = read_full_state(dcp_folder)
    weights, moments = state["model"], state["optimizer"]["state"]
    written = 0
    for folder in sorted(p for p in (universal_engine / "zero").iterdir() if p.is_dir()):
        name = folder.name
        if name not in weights:
            raise RuntimeError(f"the FSDP2 checkpoint {dcp_folder} has no parameter {name}")
        master = folder / "fp32.pt"
        saved = moments.get(name)
        if saved is not None:  # a trained parameter: its Adam state, made beside the master
            for key in MOMENTS:
                _write_param(folder / f"{key}.pt", saved[key], like=master)
            step = torch.as_tensor(saved["step"], dtype=torch.float32).reshape(())
            torch.save(step, folder / "step.pt")
        _write_param(master, weights[name], like=master)
        written += 1
    for model_states in universal_engine.glob("*model_states.pt"):  # module weights (ZeRO-1/2)
        content = _read(model_states)
        module = content.get("module") if isinstance(content, dict) else None
        if module:
            for name, tensor in list(module.items()):
                if name in weights and torch.is_tensor(tensor):
                    module[name] = weights[name].to(tensor.dtype).reshape(tensor.shape)
            torch.save(content, model_states)
    return written


def fsdp_to_universal(checkpoint: Path, engine: Any, *, is_main: bool, log: Any = None) -> Path:
    """Collective: the universal checkpoint a ZeRO engine loads to continue an FSDP2 one.
    The engine saves itself (every rank its partition; the files DeepSpeed expects, for its
    own stage), DeepSpeed's converter makes that universal, and the DCP checkpoint's values
    replace the fresh ones (module docstring). Built under step_N/ in a folder the run folder
    counts as a conversion's, and removed by `finish_fsdp_to_universal` once loaded."""
    import shutil

    from clustertune.atomicio import write_json_atomic
    from clustertune.distributed import all_ranks_agree, raise_main_failure_everywhere
    from clustertune.reshard import run_deepspeed_converter, universal_info, wait_until_visible
    from clustertune.run_folder import (
        DEEPSPEED_TAG,
        FSDP_TAG,
        UNIVERSAL_MARKER,
        UNIVERSAL_TMP_PREFIX,
    )

    work = checkpoint / f"{UNIVERSAL_TMP_PREFIX}from-fsdp2"
    if is_main:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    all_ranks_agree(True)  # the folder exists before any rank writes into it
    engine.save_checkpoint(str(work / "fresh"), tag=DEEPSPEED_TAG, client_state=universal_info())
    error: BaseException | None = None
    if is_main:
        try:
            universal = work / "universal" / DEEPSPEED_TAG
            run_deepspeed_converter(work / "fresh" / DEEPSPEED_TAG, universal, workers=1)
            count = _fill_from_dcp(universal, checkpoint / FSDP_TAG)
            write_json_atomic(work / "universal" / UNIVERSAL_MARKER, {"parameters": count})
            if log is not None:
                log(
                    f"wrote the {count} parameters of FSDP2 checkpoint {checkpoint} as DeepSpeed's universal form"
                )
        except Exception as caught:
            error = caught
    raise_main_failure_everywhere(error, f"convert {checkpoint}")
    wait_until_visible(work / "universal" / UNIVERSAL_MARKER)  # other nodes' view of the folder
    return work / "universal"


def finish_fsdp_to_universal(universal: Path, *, is_main: bool) -> None:
    """Collective: every rank has loaded; the work folder goes."""
    import shutil

    from clustertune.distributed import all_ranks_agree

    all_ranks_agree(True)
    if is_main:
        shutil.rmtree(universal.parent, ignore_errors=True)
