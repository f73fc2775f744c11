"""What one optimizer step minimises and how: the token-loss sum, AdamW, the LR schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from clustertune.config import TrainConfig
from clustertune.data import IGNORE_INDEX
from clustertune.distributed import offloads_optimizer


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


def build_optimizer(
    model: torch.nn.Module, train_cfg: TrainConfig, ds_config: dict | None
) -> torch.optim.Optimizer:
    """AdamW without decay on biases and norms; DeepSpeed's CPU Adam under ZeRO-Offload."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if "bias" in name or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]  # ZeRO drops empty groups (LoRA)
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
