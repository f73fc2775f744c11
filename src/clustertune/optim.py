"""What one optimizer step minimises and how: the token-loss sum, AdamW (or the optimizer a
DeepSpeed JSON names), the LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from clustertune.config import TrainConfig
from clustertune.data import IGNORE_INDEX
from clustertune.deepspeed_config import (
    fill_optimizer_autos,
    fill_scheduler_autos,
    offloads_optimizer,
)
from clustertune.distributed import DDPStepper, DeepSpeedStepper
from clustertune.fsdp import FSDPStepper, shard_model


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Sum (not mean) of per-token cross-entropy over the batch's target tokens; the caller
    divides by the target tokens of the whole global batch (see train.py's docstring)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    if kind == "causal":  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class WarmupDecay:
    """LR multiplier: linear warmup to 1, then linear/cosine decay to 0 at total_steps."""

    def __init__(self, warmup_steps: int, total_steps: int, kind: str) -> None:
        self.warmup_steps, self.total_steps, self.kind = warmup_steps, total_steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(progress, 1.0)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay, and none on biases and norms."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if "bias" in name or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]  # ZeRO drops empty groups (LoRA)


def build_optimizer(model: torch.nn.Module, train_cfg: TrainConfig, ds_config: dict | None) -> Any:
    """AdamW without decay on biases and norms; DeepSpeed's CPU Adam under ZeRO-Offload.

    When the DeepSpeed JSON names an optimizer, DeepSpeed builds that one: accelerate's
    DummyOptim carries the parameter groups (so biases and norms still get no decay) to
    deepspeed.initialize, and fill_optimizer_autos has put train.* into the JSON's params.
    """
    groups = parameter_groups(model, train_cfg.weight_decay)
    if ds_config is not None and "optimizer" in ds_config:
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    betas = (train_cfg.adam_beta1, train_cfg.adam_beta2)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload wants its CPU Adam

        return DeepSpeedCPUAdam(
            groups,
            lr=train_cfg.learning_rate,
            betas=betas,
            eps=train_cfg.adam_epsilon,
            adamw_mode=True,
        )
    return torch.optim.AdamW(
        groups, lr=train_cfg.learning_rate, betas=betas, eps=train_cfg.adam_epsilon
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain LambdaLR that the stepper steps once per optimizer step in both paths
    # (accelerate's wrapper would step it num_processes times per call).
    schedule = WarmupDecay(train_cfg.warmup_steps, total_steps, train_cfg.lr_schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def prepare_optimization(
    model: torch.nn.Module,
    train_cfg: TrainConfig,
    accelerator: Any,
    *,
    log: Callable[[str], None],
    total_steps: int,
    fsdp: Any = None,
    dtype: str = "fp32",
) -> tuple[Any, Any, Any, DDPStepper | DeepSpeedStepper | FSDPStepper]:
    """Optimizer, LR schedule and stepper for `model`, prepared by the Accelerator:
    (model or DeepSpeed engine, optimizer, schedule, stepper).

    Under DeepSpeed the JSON may name its own optimizer and/or scheduler (configs users bring
    from the transformers guide): their "auto"s need train.* and the run length, known only
    now, and are filled in the dict accelerate's plugin hands to deepspeed.initialize. Then
    DeepSpeed builds what the JSON names; otherwise ours (AdamW + LambdaLR) is used.

    Under FSDP2 (`fsdp`: the launch file's settings) the model is sharded here with torch's
    fully_shard and the optimizer built on its sharded parameters (fsdp.py says why not by
    accelerator.prepare).
    """
    if fsdp is not None:
        model = shard_model(model, fsdp, dtype)
        optimizer = build_optimizer(model, train_cfg, None)
        scheduler = build_scheduler(optimizer, train_cfg, total_steps)
        return (
            model,
            optimizer,
            scheduler,
            FSDPStepper(model, optimizer, scheduler, train_cfg.max_grad_norm),
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    ds_config = plugin.deepspeed_config if plugin is not None else None
    deepspeed_schedules = False
    if ds_config is not None:
        for note in [
            *fill_optimizer_autos(ds_config, train_cfg),
            *fill_scheduler_autos(ds_config, train_cfg, total_steps),
        ]:
            log(note)
        deepspeed_schedules = "scheduler" in ds_config
    optimizer = build_optimizer(model, train_cfg, ds_config)
    if deepspeed_schedules:  # DeepSpeed builds the JSON's schedule; its engine steps it
        from accelerate.utils import DummyScheduler

        model, optimizer, scheduler = accelerator.prepare(
            model, optimizer, DummyScheduler(optimizer)
        )
    elif isinstance(optimizer, torch.optim.Optimizer):  # ours, before DeepSpeed wraps it
        scheduler = build_scheduler(optimizer, train_cfg, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)  # ZeRO: the DeepSpeed engine
    else:  # DeepSpeed builds the JSON's optimizer; our schedule drives the torch one inside
        from deepspeed.runtime.lr_schedules import get_torch_optimizer

        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = build_scheduler(get_torch_optimizer(model.optimizer), train_cfg, total_steps)
    if ds_config is not None:
        stepper: DDPStepper | DeepSpeedStepper = DeepSpeedStepper(
            model, None if deepspeed_schedules else scheduler
        )
    else:
        stepper = DDPStepper(accelerator, model, optimizer, scheduler, train_cfg.max_grad_norm)
    return model, optimizer, scheduler, stepper


def schedule_change_note(
    train_cfg: TrainConfig, *, previous_total: int, total_steps: int, next_step: int, next_lr: float
) -> str:
    """What the LR schedule becomes when a resume changes the total step count
    (checkpoint.restore_schedule_position keeps this launch's schedule)."""
    shape = (
        "constant after warmup"
        if train_cfg.lr_schedule == "constant"
        else f"{train_cfg.lr_schedule} decay to 0 at step {total_steps}"
    )
    return (
        f"allow_config_change=true: total steps {previous_total} -> {total_steps}; the LR "
        f"schedule is rebuilt for {total_steps} steps (warmup {train_cfg.warmup_steps}, "
        f"{shape}): step {next_step} trains at lr {next_lr:.4g} of peak {train_cfg.learning_rate:g}."
    )
