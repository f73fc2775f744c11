"""The three training variants of train_throughput.py (seed, hf_example, clustertune) and the
runner that trains one of them a step at a time, so the caller can interleave their timed steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from common import rss_now, rss_peak, rss_peak_reset
from flops import t5_train_flops

SEED_MAX_LENGTH = 512  # the seed pads both prompt and summary to the tokenizer's 512


Step = list[np.ndarray]  # one optimizer step: its micro-batches of example indices


@dataclass
class Variant:
    name: str
    description: str
    steps: list[Step]
    collate: Callable[[np.ndarray], dict[str, torch.Tensor]]
    # (model, batch, step) -> the scalar this micro-batch backpropagates
    loss: Callable[[Any, dict[str, torch.Tensor], Step], torch.Tensor]
    # (micro-batch indices) -> padded (source, target) widths the model actually runs
    widths: Callable[[np.ndarray], tuple[int, int]]


def stratified_sample(
    batches: list[np.ndarray], count: int, lengths: np.ndarray
) -> list[np.ndarray]:
    """`count` of the epoch's global batches, evenly spaced in real tokens (kept in the plan's
    order): grouped batches range from all-short to all-long, so the first few could be
    unrepresentative, and s/epoch is extrapolated from these."""
    sizes = np.array([lengths[b].sum() for b in batches])
    by_size = np.argsort(sizes, kind="stable")
    chosen = sorted(by_size[int((k + 0.5) * len(batches) / count)] for k in range(count))
    return [batches[i] for i in chosen]


def random_steps(
    pool: np.ndarray, num_steps: int, batch_size: int, micro_batch_size: int, seed: int
) -> list[Step]:
    order = np.random.default_rng([seed, 1]).permutation(pool)
    steps = [order[i * batch_size : (i + 1) * batch_size] for i in range(num_steps)]
    return [
        [s[j : j + micro_batch_size] for j in range(0, batch_size, micro_batch_size)] for s in steps
    ]


def make_variants(
    train: Any,
    tokenizer: Any,
    plan: Any,
    global_batches: list[np.ndarray],
    micro_batch_size: int,
    seed: int,
    reference_model: Any,
) -> list[Variant]:
    from transformers import DataCollatorForSeq2Seq

    from clustertune import data as data_lib
    from clustertune.optim import token_loss_sum

    input_ids, labels = (
        list(train["input_ids"]),
        list(train["labels"]),
    )  # Python lists, not Arrow reads
    source_lengths, target_lengths = plan.source_lengths, plan.target_lengths
    pad = tokenizer.pad_token_id
    pool = np.concatenate(global_batches)
    batch_size = plan.global_batch_size
    baseline_steps = random_steps(pool, len(global_batches), batch_size, micro_batch_size, seed)

    def seed_collate(indices: np.ndarray) -> dict[str, torch.Tensor]:
        # tokenizer(..., padding="max_length", truncation=True) on prompts and on summaries
        batch = {
            k: torch.full((len(indices), SEED_MAX_LENGTH), pad, dtype=torch.long)
            for k in ("input_ids", "labels")
        }
        for row, i in enumerate(indices):
            batch["input_ids"][row, : len(input_ids[i])] = torch.tensor(input_ids[i])
            batch["labels"][row, : len(labels[i])] = torch.tensor(labels[i])
        return batch

    def mean_loss(model: Any, batch: dict[str, torch.Tensor], step: Step) -> torch.Tensor:
        return model(**batch).loss / len(step)  # HF Trainer: mean loss / accumulation steps

    hf_collator = DataCollatorForSeq2Seq(
        tokenizer, model=reference_model, label_pad_token_id=data_lib.IGNORE_INDEX
    )

    def hf_collate(indices: np.ndarray) -> dict[str, torch.Tensor]:
        return hf_collator(
            [
                {
                    "input_ids": input_ids[i],
                    "attention_mask": [1] * len(input_ids[i]),
                    "labels": labels[i],
                }
                for i in indices
            ]
        )

    collator = data_lib.Collator(pad, decoder_start_token_id=pad)

    def clustertune_collate(indices: np.ndarray) -> dict[str, torch.Tensor]:
        return collator([{"input_ids": input_ids[i], "labels": labels[i]} for i in indices])

    def clustertune_loss(model: Any, batch: dict[str, torch.Tensor], step: Step) -> torch.Tensor:
        # as train.Trainer: token-loss sum / target tokens of the whole global batch
        return token_loss_sum(model, batch, "seq2seq") / plan.target_tokens(np.concatenate(step))

    def dynamic(indices: np.ndarray) -> tuple[int, int]:
        return int(source_lengths[indices].max()), int(target_lengths[indices].max())

    return [
        Variant(
            "seed",
            "every example padded to 512 + 512, labels padded with the pad id, random order",
            baseline_steps,
            seed_collate,
            mean_loss,
            lambda _: (SEED_MAX_LENGTH, SEED_MAX_LENGTH),
        ),
        Variant(
            "hf_example",
            "DataCollatorForSeq2Seq: pad to the batch's longest, labels -100, random order",
            baseline_steps,
            hf_collate,
            mean_loss,
            dynamic,
        ),
        Variant(
            "clustertune",
            f"GlobalBatchPlan (length_group_size={plan.length_group_size}) + Collator + token_loss_sum",
            [plan.micro_batches(gb) for gb in global_batches],
            clustertune_collate,
            clustertune_loss,
            dynamic,
        ),
    ]


def padding_stats(
    variant: Variant, steps: list[Step], source_lengths: np.ndarray, target_lengths: np.ndarray
) -> tuple[int, int]:
    """(real tokens, padded token slots), inputs and labels both counted."""
    real = slots = 0
    for step in steps:
        for indices in step:
            source_width, target_width = variant.widths(indices)
            real += int(source_lengths[indices].sum() + target_lengths[indices].sum())
            slots += len(indices) * (source_width + target_width)
    return real, slots


class Runner:
    """One variant's model, optimizer and timings. Warm-up runs alone (its memory is measured
    then); timed steps are interleaved with the other variants' by the caller."""

    def __init__(self, variant: Variant, build: Callable[[], Any], device: torch.device) -> None:
        self.variant, self.device = variant, device
        self.on_gpu = device.type == "cuda"
        self.seconds, self.steps_done = 0.0, 0
        self.losses = torch.zeros((), device=device)
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_before = torch.cuda.memory_allocated()
        else:
            rss_peak_reset()
            self.memory_before = rss_now()
        self.model = build().to(device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu)

    def optimizer_step(self, step: Step) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for indices in step:
            batch = {
                k: v.to(self.device, non_blocking=True)
                for k, v in self.variant.collate(indices).items()
            }
            with self.autocast:
                loss = self.variant.loss(self.model, batch, step)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def warm_up(self, num_steps: int) -> None:
        """Untimed steps (allocator, kernels, lazy init) on the variant's largest micro-batches,
        so the memory recorded is its worst case among the timed steps: model, optimizer
        state and peak activations, on top of what was resident before it was built."""

        def padded_slots(step: Step) -> int:
            return max(len(indices) * sum(self.variant.widths(indices)) for indices in step)

        for step in sorted(self.variant.steps, key=padded_slots, reverse=True)[:num_steps]:
            self.optimizer_step(step)
        if self.on_gpu:
            torch.cuda.synchronize()
            self.peak_memory = (torch.cuda.max_memory_allocated() - self.memory_before) / 2**30
        else:
            self.peak_memory = (rss_peak() - self.memory_before) / 2**30

    def timed_step(self) -> None:
        step = self.variant.steps[self.steps_done]
        start = time.perf_counter()
        self.losses += self.optimizer_step(step)
        if self.on_gpu:  # one sync per optimizer step, as the shipped trainer's logging does
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.steps_done += 1

    def result(
        self, source_lengths: np.ndarray, target_lengths: np.ndarray, peak_tflops: float | None
    ) -> dict[str, Any]:
        variant, config = self.variant, self.model.config
        real, slots = padding_stats(variant, variant.steps, source_lengths, target_lengths)
        used = np.concatenate([np.concatenate(s) for s in variant.steps])
        useful_flops = t5_train_flops(config, source_lengths[used], target_lengths[used])
        executed_flops = executed_train_flops(variant, config)
        result = {
            "description": variant.description,
            "steps": self.steps_done,
            "seconds": self.seconds,
            "seconds_per_step": self.seconds / self.steps_done,
            "real_tokens": real,
            "padded_token_slots": slots,
            "tokens_per_second": real / self.seconds,
            "padding_efficiency": real / slots,
            "examples_per_second": len(used) / self.seconds,
            "peak_memory_gib": self.peak_memory,
            "model_tflops_per_second": useful_flops / self.seconds / 1e12,  # real tokens only
            "executed_tflops_per_second": executed_flops / self.seconds / 1e12,  # padding included
            "mean_training_loss": float(self.losses) / self.steps_done,  # each variant's own loss
        }
        if peak_tflops:
            result["mfu"] = result["model_tflops_per_second"] / peak_tflops
            result["hardware_flops_utilisation"] = (
                result["executed_tflops_per_second"] / peak_tflops
            )
        return result

    def close(self) -> None:
        del self.model, self.optimizer


def executed_train_flops(variant: Variant, config: Any) -> float:
    """FLOPs the padded batches cost: every row runs at its micro-batch's padded widths."""
    total = 0.0
    for step in variant.steps:
        for indices in step:
            source_width, target_width = variant.widths(indices)
            total += t5_train_flops(
                config, np.full(len(indices), source_width), np.full(len(indices), target_width)
            )
    return total
