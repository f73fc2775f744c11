"""The DeepSpeed JSON a launch file names: load it, fill every "auto" the training config owns
(batch sizes, clipping, precision, the optimizer and scheduler blocks users bring), and read
what the rest of the code needs from it (ZeRO stage, offload). Checking it against DeepSpeed's
own config model is clustertune.deepspeed_check.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from clustertune.deepspeed_check import _where, validate_deepspeed_config
from clustertune.errors import UserError


def _set_dotted(config: dict, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _autos(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [k for key, value in config.items() for k in _autos(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if config == "auto" else []


# Filled by accelerate from model.config.hidden_size when the model is prepared.
HIDDEN_SIZE_KEYS = {
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
}

# The "auto"s of an optimizer / scheduler block that the training config fills, as the
# transformers DeepSpeed integration fills them (HfTrainerDeepSpeedConfig.trainer_config_process);
# they wait for fill_optimizer_autos / fill_scheduler_autos, which know train.* and the run length.
OPTIMIZER_OWNED = ("lr", "betas", "eps", "weight_decay")
SCHEDULER_OWNED = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")
TRAINING_OWNED_KEYS = {
    *(f"optimizer.params.{key}" for key in OPTIMIZER_OWNED),
    *(f"scheduler.params.{key}" for key in SCHEDULER_OWNED),
}
# deepspeed.initialize reads these top-level keys outside DeepSpeedConfig.


def fill_deepspeed_config(
    raw: dict,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    max_grad_norm: float,
    dtype: str,
) -> dict:
    """Replace every "auto" with the value the training config owns; no value lives twice.

    train_batch_size = micro_batch_size x grad_accum_steps x world_size (DeepSpeed asserts it).
    The result is checked with DeepSpeed's own config parser (validate_deepspeed_config).
    "auto" in an optimizer / scheduler block stays until fill_optimizer_autos /
    fill_scheduler_autos, which know the training config and the run's length.
    """
    config = copy.deepcopy(raw)
    owned = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "bf16.enabled": dtype == "bf16",
        "fp16.enabled": dtype == "fp16",
    }
    for dotted, value in owned.items():
        _set_dotted(config, dotted, value)
    validate_deepspeed_config(config)
    leftover = [key for key in _autos(config) if key not in HIDDEN_SIZE_KEYS | TRAINING_OWNED_KEYS]
    if leftover:
        raise UserError(
            f"the DeepSpeed config has 'auto' for {leftover}, which no training setting owns; give numbers."
        )
    return config


def zero_stage(ds_config: dict | None) -> int:
    if ds_config is None:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict | None) -> bool:
    device = (
        (ds_config or {})
        .get("zero_optimization", {})
        .get("offload_optimizer", {})
        .get("device", "none")
    )
    return device not in (None, "none")


def load_deepspeed_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot read the DeepSpeed config '{path}' named by the launch file: {error}"
        ) from None


def fill_hidden_size_autos(ds_config: dict, model_config: Any) -> dict:
    """Bucket sizes from the model width, as accelerate does when it prepares a model."""
    hidden = getattr(model_config, "hidden_size", None) or model_config.d_model
    zero = ds_config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds_config


def _same(explicit: Any, ours: Any) -> bool:
    if isinstance(ours, list | tuple):
        return (
            isinstance(explicit, list | tuple)
            and len(explicit) == len(ours)
            and all(_same(a, b) for a, b in zip(explicit, ours, strict=True))
        )
    if isinstance(explicit, bool) or not isinstance(explicit, int | float):
        return False
    return float(explicit) == float(ours)


def _fill_match(
    params: dict, key: str, value: Any, block: str, owner: str, compared: Any = None
) -> None:
    """ "auto" or absent -> the training value; an explicit value must equal it (as the
    transformers integration's fill_match, with our setting names in the one-line refusal)."""
    if params.get(key, "auto") == "auto":
        params[key] = value
    elif not _same(params[key], value if compared is None else compared):
        raise UserError(
            f"{_where()} sets {block}.params.{key}={json.dumps(params[key])} but the training "
            f'config has {owner}; make them equal, or write "auto" to take the training value.'
        )


def _deepspeed_runs_on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


# Keys DeepSpeed takes out of optimizer.params itself before building torch's Adam.
_DEEPSPEED_ADAM_KEYS = {"torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach"}


def fill_optimizer_autos(config: dict, train: Any) -> list[str]:
    """Fill the JSON's optimizer block from train.* in place; return lines for the log.

    Adam/AdamW take all four of lr, betas, eps, weight_decay, so absent ones are filled too
    (DeepSpeed's defaults would silently differ from the training config); other optimizers
    get only what the JSON marks "auto". Without CUDA, DeepSpeed's fused Adam cannot be built:
    DeepSpeed's own switch `torch_adam` then builds torch's Adam(W) with the same values.
    """
    block = config.get("optimizer")
    if block is None:
        return []
    kind, params = block["type"], block.setdefault("params", {})
    is_adam = kind.lower() in ("adam", "adamw")
    ours = {
        "lr": (train.learning_rate, f"train.learning_rate={train.learning_rate}"),
        "betas": (
            [train.adam_beta1, train.adam_beta2],
            f"train.adam_beta1={train.adam_beta1}, train.adam_beta2={train.adam_beta2}",
        ),
        "eps": (train.adam_epsilon, f"train.adam_epsilon={train.adam_epsilon}"),
        "weight_decay": (train.weight_decay, f"train.weight_decay={train.weight_decay}"),
    }
    for key, (value, owner) in ours.items():
        if is_adam or params.get(key) == "auto":
            _fill_match(params, key, value, "optimizer", owner)
    shown = ", ".join(f"{k} {params[k]}" for k in ours if k in params)
    notes = [
        f"optimizer: {kind} as the DeepSpeed config names it, built by DeepSpeed ({shown}; "
        "no weight decay on biases and norms)"
    ]
    if is_adam and not offloads_optimizer(config) and _deepspeed_runs_on_cpu():
        if not params.get("torch_adam", False):
            import inspect

            accepted = set(inspect.signature(torch.optim.AdamW).parameters) | _DEEPSPEED_ADAM_KEYS
            unsupported = sorted(set(params) - accepted)
            if unsupported:
                raise UserError(
                    f"{_where()}: without CUDA torch's AdamW replaces DeepSpeed's fused Adam, and "
                    f"it has no optimizer.params {unsupported}; remove them to run on CPU."
                )
            params["torch_adam"] = True
            notes.append(
                "optimizer: no CUDA here, so DeepSpeed's fused Adam cannot be built; torch's "
                "AdamW is used with the same values (optimizer.params.torch_adam=true). On a GPU "
                "the JSON's optimizer is used as written."
            )
    return notes


def fill_scheduler_autos(config: dict, train: Any, total_steps: int | None) -> list[str]:
    """Fill the JSON's scheduler block in place (total_steps None: leave the run length for
    later); return lines for the log. Which keys a schedule takes is read from DeepSpeed's
    scheduler class, so absent ones are filled too (WarmupDecayLR's default peak is 1e-3)."""
    block = config.get("scheduler")
    if block is None:
        return []
    import inspect

    from deepspeed.runtime import lr_schedules

    kind, params = block["type"], block.setdefault("params", {})
    accepted = inspect.signature(getattr(lr_schedules, kind)).parameters
    warmup = train.warmup_steps
    ours = {
        # DeepSpeed refuses 0 warmup steps; accelerate fills max(1, warmup) the same way
        "warmup_num_steps": (max(1, warmup), f"train.warmup_steps={warmup}", warmup),
        "warmup_max_lr": (
            train.learning_rate,
            f"train.learning_rate={train.learning_rate}",
            train.learning_rate,
        ),
        "total_num_steps": (
            total_steps,
            f"{total_steps} total steps (train.max_steps, or num_epochs x steps per epoch)",
            total_steps,
        ),
    }
    for key in SCHEDULER_OWNED:
        if key not in accepted and params.get(key) == "auto":
            raise UserError(
                f'{_where()}: scheduler.params.{key} is "auto" but DeepSpeed\'s {kind} has no '
                f"such parameter; remove it."
            )
    if "warmup_min_lr" in accepted and params.get("warmup_min_lr", "auto") == "auto":
        params["warmup_min_lr"] = 0  # no training setting: any explicit start value is kept
    for key, (value, owner, compared) in ours.items():
        if key in accepted and value is not None:
            _fill_match(params, key, value, "scheduler", owner, compared)
    shown = ", ".join(f"{k} {v}" for k, v in params.items())
    notes = [
        f"schedule: DeepSpeed's {kind} from the DeepSpeed config ({shown}), stepped by the "
        "DeepSpeed engine; it replaces train.lr_schedule"
    ]
    if "warmup_type" in accepted and params.get("warmup_type", "log") == "log":
        notes.append(
            "schedule: DeepSpeed warms up logarithmically unless scheduler.params.warmup_type "
            'is "linear" (train.lr_schedule warms up linearly); kept as written.'
        )
    return notes


def check_optimizer_and_scheduler(template: dict | None, train: Any) -> None:
    """Refuse, before any compute, an optimizer / scheduler value in the launch file's JSON that
    contradicts train.* (the run length is checked once it is known, in the Trainer)."""
    if template is None:
        return
    config = copy.deepcopy(template)
    fill_optimizer_autos(config, train)
    fill_scheduler_autos(config, train, total_steps=None)
