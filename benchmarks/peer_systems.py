#!/usr/bin/env python
"""One system of benchmarks/peers.py, trained in its own process, one optimizer step per turn.

    python benchmarks/peer_systems.py --system NAME --spec SPEC.json --go-fd R --ready-fd W

peers.py starts one of these per system and hands out turns: at every step boundary the
worker writes `step` on its ready pipe and blocks until it reads `go`, so only one system
computes at any moment and load from other processes falls on all of them alike (as in
train_throughput.py's round-robin). The worker sums the seconds from each `go` to its next
boundary; setup, a common warm-up and the loss checks are outside those seconds.

Systems (each the real tool, configured as its users run it):
  seq2seq_trainer        transformers' Seq2SeqTrainer as examples/pytorch/summarization/
                         run_summarization.py sets it up: DataCollatorForSeq2Seq (labels
                         padded with -100), length-grouped sampling, AdamW, linear schedule;
  clustertune            recipes/finetune.py's Trainer (setup() -> train()), as shipped;
  clustertune_token_budget  the same with train.micro_batch_tokens (skipped while unused);
  trl_sft_trainer        TRL's SFTTrainer, padding-free (decoder-only, DialogSum as chat);
  clustertune_packed / clustertune_padded  the recipe with data.packing true / false.
Every worker counts the real (non-pad) and padded tokens of the micro-batches its system
collates, with the same code, and measures the loss of its final weights on the same fixed
examples with the same formula (token mean), since the systems log differently normalised
losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import rss_now, rss_peak, rss_peak_reset

REPO = Path(__file__).resolve().parents[1]


class SkipSystem(Exception):
    """This system cannot run here (said why); the others go on."""


class Turns:
    """Step boundaries: report, wait for our turn, time what runs until the next boundary."""

    def __init__(self, go_fd: int, ready_fd: int) -> None:
        self.go = os.fdopen(go_fd, "r")
        self.ready = os.fdopen(ready_fd, "w")
        self.started: float | None = None
        self.intervals: list[float] = []

    def _close_interval(self) -> None:
        if self.started is not None:
            self.intervals.append(time.perf_counter() - self.started)
            self.started = None

    def wait(self, message: str = "step") -> None:
        self._close_interval()
        self.ready.write(message + "\n")
        self.ready.flush()
        if self.go.readline().strip() != "go":
            sys.exit("peers.py went away")
        self.started = time.perf_counter()

    def done(self) -> None:
        self.ready.write("done\n")
        self.ready.flush()


class TokenCounter:
    """Wraps a collator: counts real and padded tokens of every micro-batch it returns.
    Real: attention-mask ones (inputs) + labels that are not -100 (decoder side, seq2seq)."""

    def __init__(self, collate: Any, seq2seq: bool) -> None:
        self.collate, self.seq2seq = collate, seq2seq
        self.real = self.slots = self.micro_batches = 0
        self.shapes: list[tuple[int, int, int]] = []  # (rows, input width, label width)

    def __call__(self, examples: Any) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        else:  # packed rows: no padding
            self.real += int(batch["input_ids"].numel())
        self.slots += int(batch["input_ids"].numel())
        if self.seq2seq:
            self.real += int((batch["labels"] != -100).sum())
            self.slots += int(batch["labels"].numel())
        self.micro_batches += 1
        self.shapes.append((*batch["input_ids"].shape, batch["labels"].shape[-1]))
        return batch


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def fixed_examples_loss(model: Any, examples: list[dict[str, list[int]]], spec: dict) -> float:
    """Token-mean loss of `model` on the spec's fixed examples (eval mode, no dropout): the
    same formula for every system, whatever loss its own logs show."""
    from clustertune import data as data_lib
    from clustertune.optim import token_loss_sum

    collate = data_lib.Collator(spec["pad_token_id"], spec.get("decoder_start_token_id"))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16])
            total += float(token_loss_sum(model, batch, spec["kind"]))
            count += int((batch["labels"] != data_lib.IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count


def executed_flops(model: Any, shapes: list[tuple[int, int, int]], spec: dict) -> float | None:
    """Matmul FLOPs the padded micro-batches cost (benchmarks/flops.py), seq2seq only."""
    if spec["kind"] != "seq2seq":
        return None
    import numpy as np
    from flops import t5_train_flops

    config = model.config
    return sum(t5_train_flops(config, np.full(n, s), np.full(n, t)) for n, s, t in shapes)


def warm_up(model: Any, spec: dict, packed: bool = False) -> None:
    """One untimed forward + backward of the longest micro-batch (the same for every system;
    packed into one row for the systems that train packed): allocator, thread pools, kernels
    and transformers' first packed-mask call are warm, so the timed epoch starts in steady
    state. No optimizer step: the weights stay the initial ones."""
    from clustertune import data as data_lib
    from clustertune.optim import token_loss_sum

    collate = data_lib.Collator(
        spec["pad_token_id"], spec.get("decoder_start_token_id"), packing=packed
    )
    token_loss_sum(model, collate(spec["longest_examples"]), spec["kind"]).backward()
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- systems
def trainer_arguments(spec: dict) -> dict[str, Any]:
    """TrainingArguments both transformers-based peers share: the spec's hyperparameters, one
    epoch, linear schedule, a log record per step, no evaluation, no saving."""
    hp = spec["hyperparameters"]
    return dict(
        output_dir=f"{spec['work_dir']}/{spec['system']}",
        per_device_train_batch_size=hp["micro_batch_size"],
        gradient_accumulation_steps=hp["global_batch_size"] // hp["micro_batch_size"],
        num_train_epochs=1,
        learning_rate=hp["learning_rate"],
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=hp["seed"],
        dataloader_num_workers=0,
        bf16=bf16_available(),  # what clustertune's model.dtype auto picks
    )


def step_boundaries(turns: Turns) -> Any:
    """A TrainerCallback: a step boundary at each on_step_begin; logged losses in `.losses`."""
    from transformers import TrainerCallback

    class Boundaries(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            turns.wait()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Boundaries()


def train_transformers_trainer(
    trainer: Any, counter: TokenCounter, spec: dict, turns: Turns, result: dict, packed: bool
) -> Any:
    """Warm up, train the epoch (its callback takes the turns), record what it logged."""
    model, args = trainer.model, trainer.args
    optim = getattr(args.optim, "value", args.optim)
    result["optimizer"] = f"{optim} (the transformers default), lr {args.learning_rate}"
    result["initial_loss_fixed_examples"] = fixed_examples_loss(model, spec["fixed_examples"], spec)
    warm_up(model, spec, packed=packed)
    trainer.train()
    turns.wait("end")
    result["optimizer_steps"] = trainer.state.global_step
    result["logged_losses"] = next(
        c.losses for c in trainer.callback_handler.callbacks if hasattr(c, "losses")
    )
    result["counter"] = counter
    return model


def run_seq2seq_trainer(spec: dict, turns: Turns, result: dict) -> Any:
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["model_dir"])
    rows = datasets.load_dataset("json", data_files=spec["train_file"], split="train")
    template = spec["prompt_template"]

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        # run_summarization.py: `source_prefix + text`, tokenizer(..., max_length, truncation);
        # here the prompt template (prefix and suffix), so both systems see the same token ids.
        prompts = [template.format(dialogue=d) for d in batch["dialogue"]]
        inputs = tokenizer(prompts, max_length=spec["max_source_length"], truncation=True)
        labels = tokenizer(
            text_target=batch["summary"], max_length=spec["max_target_length"], truncation=True
        )
        inputs["labels"] = labels["input_ids"]
        return inputs

    train = rows.map(preprocess, batched=True, remove_columns=rows.column_names)
    counter = TokenCounter(
        DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100), seq2seq=True
    )
    args = Seq2SeqTrainingArguments(
        # run_summarization.py's --group_by_length; transformers 5 spells it this way
        train_sampling_strategy="group_by_length",
        **trainer_arguments(spec),
    )
    boundaries = step_boundaries(turns)
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=counter,
        processing_class=tokenizer,
        callbacks=[boundaries],
    )
    return train_transformers_trainer(trainer, counter, spec, turns, result, packed=False)


def run_trl_sft_trainer(spec: dict, turns: Turns, result: dict) -> Any:
    """TRL's SFTTrainer, padding-free: each micro-batch of whole examples flattened into one
    row with position ids restarting per example (what clustertune's data.packing does), on
    prompt-completion rows: the prompt as the user turn, the summary as the assistant turn,
    loss on the completion only (TRL's default for this format)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    rows = datasets.load_dataset("json", data_files=spec["train_file"], split="train")
    template = spec["prompt_template"]
    chats = rows.map(
        lambda row: {
            "prompt": [{"role": "user", "content": template.format(dialogue=row["dialogue"])}],
            "completion": [{"role": "assistant", "content": row["summary"]}],
        },
        remove_columns=rows.column_names,
    )
    args = SFTConfig(
        padding_free=True,
        max_length=None,  # padding-free without packing: TRL asks for pre-cut inputs
        **trainer_arguments(spec),
    )
    boundaries = step_boundaries(turns)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=chats,
        processing_class=tokenizer,
        callbacks=[boundaries],
    )
    counter = TokenCounter(trainer.data_collator, seq2seq=False)
    trainer.data_collator = counter  # after construction: TRL refuses a custom padding-free one
    return train_transformers_trainer(trainer, counter, spec, turns, result, packed=True)


def clustertune_config_args(spec: dict, extra: list[str]) -> list[str]:
    hp = spec["hyperparameters"]
    return [
        f"--output_dir={spec['work_dir']}/{spec['system']}",
        "--resume=never",
        f"--seed={hp['seed']}",
        f"--model.name_or_path={spec['model_dir']}",
        f"--data.train_file={spec['train_file']}",
        f"--data.max_source_length={spec['max_source_length']}",
        f"--data.max_target_length={spec['max_target_length']}",
        "--train.num_epochs=1",
        f"--train.global_batch_size={hp['global_batch_size']}",
        f"--train.micro_batch_size={hp['micro_batch_size']}",
        f"--train.learning_rate={hp['learning_rate']}",
        f"--train.weight_decay={hp['weight_decay']}",
        f"--train.max_grad_norm={hp['max_grad_norm']}",
        "--train.warmup_steps=0",
        "--train.lr_schedule=linear",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
        *extra,
    ]


def run_clustertune(spec: dict, turns: Turns, result: dict, extra: list[str]) -> Any:
    """recipes/finetune.py's main() up to the training loop (no final save: the peer saves
    nothing either), with two benchmark hooks on the built Trainer: the token counter around
    its collator and a step boundary after each optimizer step."""
    import clustertune.quiet  # noqa: F401  (what recipes/finetune.py imports first)
    from clustertune.atomicio import read_jsonl
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.train import Trainer

    cfg = parse_config(FinetuneConfig, clustertune_config_args(spec, extra))
    trainer = Trainer(cfg)
    trainer.setup()
    if any("micro_batch_tokens" in e for e in extra) and not trainer.plan.micro_batch_tokens:
        trainer.runtime.shutdown()
        raise SkipSystem(
            f"the config accepts {' '.join(extra)} but the Trainer's batch plan does not use it yet"
        )
    counter = TokenCounter(trainer.data.collator, seq2seq=spec["kind"] == "seq2seq")
    trainer.data.collator = counter
    optimizer_step = trainer.stepper.optimizer_step

    def step_then_wait() -> Any:
        grad_norm = optimizer_step()
        turns.wait()
        return grad_norm

    trainer.stepper.optimizer_step = step_then_wait
    model = trainer.accelerator.unwrap_model(trainer.model)
    result["optimizer"] = f"torch.optim.AdamW, lr {cfg.train.learning_rate}"
    result["initial_loss_fixed_examples"] = fixed_examples_loss(model, spec["fixed_examples"], spec)
    warm_up(trainer.model, spec, packed=cfg.data.packing)
    turns.wait()  # the first step starts on our first turn
    trainer.train()
    turns.wait("end")
    records = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    result["optimizer_steps"] = trainer.total_steps
    result["logged_losses"] = [r["loss"] for r in records if "loss" in r]
    auto = [r for r in records if r.get("event") == "auto_batch"]
    if auto:
        result["auto_batch"] = auto[0]
    result["counter"] = counter
    trainer.runtime.shutdown()
    return model


SYSTEMS = {
    "seq2seq_trainer": lambda spec, turns, result: run_seq2seq_trainer(spec, turns, result),
    "clustertune": lambda spec, turns, result: run_clustertune(spec, turns, result, []),
    "clustertune_token_budget": lambda spec, turns, result: run_clustertune(
        spec, turns, result, [f"--train.micro_batch_tokens={spec['micro_batch_tokens']}"]
    ),
    "trl_sft_trainer": lambda spec, turns, result: run_trl_sft_trainer(spec, turns, result),
    "clustertune_packed": lambda spec, turns, result: run_clustertune(
        spec, turns, result, ["--data.packing=true"]
    ),
    "clustertune_padded": lambda spec, turns, result: run_clustertune(
        spec, turns, result, ["--data.packing=false"]
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--go-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    spec = {**json.loads(args.spec.read_text()), "system": args.system}
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Both stacks imported before the memory baseline, so it is the same for every system.
    import transformers.trainer  # noqa: F401

    import clustertune.train  # noqa: F401

    rss_peak_reset()
    baseline = rss_now()
    turns = Turns(args.go_fd, args.ready_fd)
    result: dict[str, Any] = {"system": args.system}
    try:
        model = SYSTEMS[args.system](spec, turns, result)
    except SkipSystem as skip:
        Path(spec["work_dir"], f"{args.system}.json").write_text(json.dumps({"skipped": str(skip)}))
        turns.ready.write("skip\n")
        turns.ready.flush()
        return
    peak = rss_peak()
    counter = result.pop("counter")
    seconds = sum(turns.intervals)
    flops = executed_flops(model, counter.shapes, spec)
    if flops:
        result["executed_tflop"] = flops / 1e12
        result["executed_tflops_per_second"] = flops / seconds / 1e12
    result.update(
        seconds=seconds,
        step_seconds=turns.intervals,
        real_tokens=counter.real,
        padded_token_slots=counter.slots,
        micro_batches=counter.micro_batches,
        tokens_per_second=counter.real / seconds,
        padding_efficiency=counter.real / counter.slots,
        peak_rss_gib=peak / 2**30,
        peak_rss_above_imports_gib=(peak - baseline) / 2**30,
        final_loss_fixed_examples=fixed_examples_loss(model, spec["fixed_examples"], spec),
        torch_threads=torch.get_num_threads(),
    )
    Path(spec["work_dir"], f"{args.system}.json").write_text(json.dumps(result, indent=2))
    turns.done()


if __name__ == "__main__":
    main()
