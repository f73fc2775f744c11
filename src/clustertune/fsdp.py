"""FSDP2: PyTorch's `fully_shard` as the second engine beside DeepSpeed ZeRO.

An accelerate launch file with `distributed_type: FSDP` and `fsdp_version: 2` (launch/fsdp2.yaml,
as `accelerate config` writes it) exports its settings to every process as FSDP_* variables;
`fsdp_settings` reads them back. clustertune then shards the model itself with torch's
`fully_shard` (each transformer block one group, then the root), builds the optimizer on the
sharded parameters and drives the step (`FSDPStepper`), instead of accelerator.prepare:
accelerate ignores an FSDP config on a machine without GPUs (PITFALLS: every rank would train
alone, silently), so its FSDP path cannot be the one tested here, and one code path for CPU
and GPU is the one that is tested. accelerate still makes the process group and places the
device; its own FSDP plugin is switched off for the run (`accelerate_without_fsdp`).

Precision: model.dtype bf16 keeps fp32 master weights and computes in bf16 through FSDP2's
MixedPrecisionPolicy (parameters cast to bf16 when gathered, gradients reduced in fp32);
fp32 computes in fp32. fsdp_offload_params keeps parameters, gradients and the optimizer
state in CPU memory (CPUOffloadPolicy; the optimizer step runs on the CPU).

Loss arithmetic is the DDP stepper's: FSDP2 averages gradients over the ranks in its
reduce-scatter, so the caller's loss is multiplied by the world size; accumulation skips the
reduce-scatter on all but the last micro-batch (set_requires_gradient_sync); clipping is over
the whole gradient (clip_grad_norm_ on the sharded DTensor gradients reduces the norm over
the ranks). 1 rank x micro 4 and 2 ranks x micro 1 x accumulation 2 give the same updates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from clustertune.errors import UserError

# The state-dict types accelerate's FSDP settings name; checkpoints are always sharded
# (torch.distributed.checkpoint), so only SHARDED_STATE_DICT describes what is written.
SHARDED = "SHARDED_STATE_DICT"
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "NO_WRAP")


# What `accelerate launch` exports from a launch file's fsdp_config (keys with or without the
# fsdp_ prefix) for the settings clustertune reads: accelerate.utils.launch.prepare_multi_gpu_env.
LAUNCH_FILE_VARIABLES = {
    "fsdp_version": "FSDP_VERSION",
    "fsdp_auto_wrap_policy": "FSDP_AUTO_WRAP_POLICY",
    "fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP",
    "fsdp_state_dict_type": "FSDP_STATE_DICT_TYPE",
    "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD",
    "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
    "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING",
}


@dataclass(frozen=True)
class FSDPSettings:
    """The FSDP_* settings of the launch file (accelerate launch exports them)."""

    version: int
    wrap_policy: str  # TRANSFORMER_BASED_WRAP | NO_WRAP
    wrap_classes: tuple[str, ...]  # empty: the model's own blocks (_no_split_modules)
    state_dict_type: str
    reshard_after_forward: bool
    offload_params: bool
    cpu_ram_efficient_loading: bool
    activation_checkpointing: bool
    mixed_precision: str  # accelerate's mixed_precision of the launch file: no | bf16 | fp16

    def describe(self) -> str:
        offload = ""
        if self.offload_params:
            offload = ", parameters and optimizer in CPU memory" + (
                "" if torch.cuda.is_available() else " (no GPU: where they are anyway)"
            )
        return f"FSDP2{offload}"


def fsdp_settings(env: Mapping[str, str] | None = None) -> FSDPSettings | None:
    """The launch file's FSDP settings from the variables accelerate launch exported (env:
    this process's environment unless given), or None when this is not an FSDP launch."""
    env = os.environ if env is None else env

    def flag(name: str, default: str = "false") -> bool:
        return env.get(name, default).lower() == "true"

    if not flag("ACCELERATE_USE_FSDP"):
        return None
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FSDPSettings(
        version=int(env.get("FSDP_VERSION", "1")),
        wrap_policy=env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
        # "A,B" as accelerate documents it; a YAML list reaches the processes as "['A', 'B']"
        wrap_classes=tuple(name for c in classes.split(",") if (name := c.strip().strip("[]'\" "))),
        state_dict_type=env.get("FSDP_STATE_DICT_TYPE", SHARDED),
        reshard_after_forward=flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        offload_params=flag("FSDP_OFFLOAD_PARAMS"),
        cpu_ram_efficient_loading=flag("FSDP_CPU_RAM_EFFICIENT_LOADING"),
        activation_checkpointing=flag("FSDP_ACTIVATION_CHECKPOINTING"),
        mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"),
    )


def launch_file_settings(launch: Mapping[str, Any]) -> FSDPSettings | None:
    """The FSDP settings the processes of this launch file will read (what accelerate launch
    exports from it, rendered as it renders them), so that a launch file can be checked
    before it is launched (clustertune-submit); None when it is not an FSDP launch file."""
    if str(launch.get("distributed_type", "NO")).upper() != "FSDP":
        return None
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": str(launch.get("mixed_precision") or "no").lower(),
    }
    for key, value in (launch.get("fsdp_config") or {}).items():
        name = LAUNCH_FILE_VARIABLES.get(key if key.startswith("fsdp_") else f"fsdp_{key}")
        if name is not None and value is not None:
            env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return fsdp_settings(env)


def check_fsdp_settings(
    settings: FSDPSettings, dtype: str | None = None, model_config: Any = None
) -> None:
    """Refuse, before any compute, a launch file that contradicts the training config or
    that clustertune cannot resume from: one line naming the key and the fix. Without a
    dtype or model config (clustertune-submit, before the job resolves them) the checks
    that need them are left to the job."""
    if settings.version != 2:
        raise UserError(
            f"fsdp_config.fsdp_version={settings.version}: clustertune runs FSDP2 (fully_shard, "
            "DTensor state dicts); set fsdp_version: 2 (launch/fsdp2.yaml), or use a ZeRO "
            "launch file (launch/zero3.yaml shards as FSDP1's FULL_SHARD does)."
        )
    if settings.state_dict_type != SHARDED:
        raise UserError(
            f"fsdp_config.fsdp_state_dict_type={settings.state_dict_type}: FSDP2 runs are "
            "checkpointed sharded with torch.distributed.checkpoint (every rank writes its "
            "shard, any world size resumes) and final/ is always a full Hugging Face folder; "
            f"set fsdp_state_dict_type: {SHARDED}."
        )
    if settings.wrap_policy not in WRAP_POLICIES:
        raise UserError(
            f"fsdp_config.fsdp_auto_wrap_policy={settings.wrap_policy}: use "
            "TRANSFORMER_BASED_WRAP (each transformer block a shard group) or NO_WRAP."
        )
    wanted = {"bf16": "bf16", "fp16": "fp16"}.get(settings.mixed_precision)
    if wanted is not None and dtype is not None and wanted != dtype:
        raise UserError(
            f"the launch file's mixed_precision={settings.mixed_precision} contradicts "
            f"model.dtype={dtype}, which owns the precision; set model.dtype={wanted}, or "
            "remove mixed_precision from the launch file."
        )
    if (
        settings.wrap_policy == "TRANSFORMER_BASED_WRAP"
        and settings.wrap_classes
        and model_config is not None
    ):
        known = set(block_classes(model_config))
        unknown = [c for c in settings.wrap_classes if c not in known]
        if unknown:
            raise UserError(
                f"fsdp_config.fsdp_transformer_layer_cls_to_wrap names {', '.join(unknown)}, "
                f"which '{model_config.model_type}' models do not have (their blocks: "
                f"{', '.join(sorted(known)) or 'none'}); leave it empty to use the model's own."
            )


def apply_fsdp_model_settings(settings: FSDPSettings, model_cfg: Any) -> list[str]:
    """The launch file's settings that concern the model itself, applied to `model_cfg`
    (model.*); one log line for each that takes effect or is not used."""
    notes = []
    if settings.activation_checkpointing and not model_cfg.gradient_checkpointing:
        # the same as model.gradient_checkpointing (each block's activations recomputed in
        # backward), which does the work under every engine
        model_cfg.gradient_checkpointing = True
        notes.append(
            "fsdp_activation_checkpointing: true in the launch file: gradient checkpointing on "
            "(model.gradient_checkpointing=true)."
        )
    if settings.cpu_ram_efficient_loading:
        notes.append(
            "fsdp_cpu_ram_efficient_loading: true in the launch file is not used: every rank "
            "loads the whole model in CPU memory (4 bytes a parameter) before sharding it."
        )
    return notes


def block_classes(model_config: Any) -> list[str]:
    """The model's transformer-block classes (what transformers never splits: the shard
    groups), from its class alone, without loading weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = (
        AutoModelForSeq2SeqLM
        if getattr(model_config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )
    model_class = auto._model_mapping[type(model_config)]
    return list(getattr(model_class, "_no_split_modules", None) or [])


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """accelerate would shard the model itself when it sees ACCELERATE_USE_FSDP (on a GPU
    machine); clustertune shards it (module docstring), so accelerate does not see it."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def shard_model(model: torch.nn.Module, settings: FSDPSettings, dtype: str) -> Any:
    """`fully_shard` each transformer block, then the root: one all-gather per block in
    forward and backward, parameters freed again after each (reshard_after_forward)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    config = getattr(model, "config", None)
    names = set(settings.wrap_classes) or set(block_classes(config) if config else [])
    options: dict[str, Any] = {"reshard_after_forward": settings.reshard_after_forward}
    if dtype in ("bf16", "fp16"):
        compute = torch.bfloat16 if dtype == "bf16" else torch.float16
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # Without a GPU the parameters are in CPU memory already: nothing to offload. Otherwise
    # fully_shard moves each group's parameters and buffers to the GPU as it shards them (the
    # blocks first, the root last), so the GPU never holds more than one unsharded group.
    if settings.offload_params and torch.cuda.is_available():
        options["offload_policy"] = CPUOffloadPolicy()
    if settings.wrap_policy == "TRANSFORMER_BASED_WRAP":
        for module in model.modules():
            if type(module).__name__ in names:
                fully_shard(module, **options)
    fully_shard(model, **options)
    return model


class FSDPStepper:
    """FSDP2: accumulate without the reduce-scatter, then clip and step ourselves."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def micro_step(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        # FSDP2 decides in backward whether to reduce-scatter: set it before.
        self.model.set_requires_gradient_sync(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # over every rank's shard
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(full)

    def loss_multiplier(self, world_size: int, grad_accum_steps: int) -> int:
        return world_size  # the reduce-scatter averages over ranks; accumulation just sums


# ------------------------------------------------------------------ state dicts


def is_sharded(model: Any) -> bool:
    """The model was sharded with fully_shard (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights in CPU memory on the main process (final/); the
    other ranks take part in the gather and get an empty dict (full_state_dict + cpu_offload)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded(folder: Any, model: Any, optimizer: Any) -> None:
    """Collective: every rank writes its shard of the model and optimizer state (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Any, model: Any, optimizer: Any) -> None:
    """Collective: read a DCP checkpoint of any world size into this one's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def read_full_state(folder: Any) -> dict[str, Any]:
    """A DCP checkpoint as whole tensors, without a process group (clustertune-checkpoint):
    {"model": {name: tensor}, "optimizer": {...}}, through DCP's own converter."""
    import tempfile
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "state.pt"
        dcp_to_torch_save(str(folder), str(whole))
        return torch.load(whole, weights_only=False, map_location="cpu")
