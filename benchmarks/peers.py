#!/usr/bin/env python
"""clustertune against the tools a user would otherwise use, side by side in one run.

    python benchmarks/peers.py --threads 1 --json benchmarks/peers.json   # CPU, ~15 min busy
    python benchmarks/peers.py --quick --data smoke --json /tmp/p.json  # checks it works

Workloads (`--workload`):
  seq2seq  a T5 with random weights (shape `--shape`, default `cpu`: 11.5 M parameters) on
           DialogSum (../shared/data/dialogsum; skipped with a message when absent):
           transformers' Seq2SeqTrainer set up as run_summarization.py does, vs clustertune's
           recipe as shipped, and with train.micro_batch_tokens where the Trainer honours it
           (skipped, with a note, where it does not);
  causal   a Llama with random weights (`--causal-shape`, default `cpu`: 8.4 M parameters) on
           the same DialogSum examples as chat (prompt = user turn, summary = assistant turn,
           ChatML, loss on the summary): TRL's SFTTrainer padding-free vs clustertune with
           data.packing true and false. Needs the `bench` extra (TRL); skipped with a message
           without it.

Same for every system: model shape and initial weights (saved once, loaded by each), the same
`steps x batch-size` examples (one epoch over them, so exactly the same real tokens), the
same examples per optimizer step and micro-batch size, AdamW with the same learning rate,
weight decay, clipping and linear schedule, fp32 on CPU (bf16 where the system chooses it on a
GPU), no evaluation and no saving during training. Each system runs in its own process
(benchmarks/peer_systems.py), so peak memory (RSS) is its own; the processes take turns one
optimizer step at a time, so machine load falls on all alike. Before its timed epoch each
does one untimed forward+backward of the same longest micro-batch (warm-up). Default
tokenizer: dialogsum-bpe (FLAN-T5-like lengths, see README). The JSON holds, per workload,
one entry per system and ratio_vs_<peer> (clustertune's real tokens/s / the peer's), with the
machine's load average (1, 5, 15 min) before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DIALOGSUM,
    LLAMA_SHAPES,
    SHAPES,
    add_shared_arguments,
    environment,
    load_pairs,
    load_tokenizer,
    publish,
    quiet_libraries,
    save_llama_folder,
    save_t5_folder,
)

HERE = Path(__file__).resolve().parent
PEERS = {"seq2seq": "seq2seq_trainer", "causal": "trl_sft_trainer"}
FIXED_EXAMPLES = 64  # the loss of every system's final weights is measured on these


# --------------------------------------------------------------------------- preparing
def fields(config_class: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def workload_systems(workload: str) -> tuple[list[str], list[str]]:
    """The systems to run and notes on those left out (a config key that does not exist)."""
    from clustertune.config import DataConfig, TrainConfig

    if workload == "seq2seq":
        systems, notes = ["seq2seq_trainer", "clustertune"], []
        if "micro_batch_tokens" in fields(TrainConfig):
            systems.append("clustertune_token_budget")
        else:
            notes.append(
                "clustertune_token_budget skipped: train.micro_batch_tokens does not exist"
            )
        return systems, notes
    if "packing" not in fields(DataConfig):
        return ["trl_sft_trainer"], ["clustertune_packed/padded skipped: no data.packing yet"]
    return ["trl_sft_trainer", "clustertune_packed", "clustertune_padded"], []


def prepare(workload: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Examples, tokenizer and initial weights, written once for every system to load."""
    import datasets

    from clustertune import data as data_lib
    from clustertune.atomicio import write_jsonl_atomic
    from clustertune.config import SEED_PROMPT

    rows, data_source = load_pairs("smoke" if args.data == "smoke" else "dialogsum")
    count = args.steps * args.batch_size
    if count > len(rows):
        sys.exit(f"--steps {args.steps} x --batch-size {args.batch_size} > {len(rows)} examples.")
    chosen = np.sort(np.random.default_rng(args.seed).choice(len(rows), count, replace=False))
    write_jsonl_atomic(work / "train.jsonl", [rows[i] for i in chosen])
    tokenizer, tokenizer_note = load_tokenizer(
        args.tokenizer, (t for r in rows for t in (r["dialogue"], r["summary"]))
    )
    if workload == "seq2seq":
        model = save_t5_folder(args.shape, tokenizer, args.seed, work / "model")
        shape, dims = args.shape, SHAPES[args.shape]
        spec_ = data_lib.TokenizeSpec("seq2seq", SEED_PROMPT, "summary", 512, 128)
    else:  # the prompt as the user turn, the summary as the assistant turn (ChatML)
        tokenizer, model = save_llama_folder(
            args.causal_shape, tokenizer, args.seed, work / "model"
        )
        shape, dims = f"llama {args.causal_shape}", LLAMA_SHAPES[args.causal_shape]
        from clustertune.chat import training_template

        spec_ = data_lib.TokenizeSpec(
            "causal", SEED_PROMPT, "summary", 512, 128, template=training_template(tokenizer)
        )
    tokenized = data_lib.tokenize_dataset(
        datasets.Dataset.from_list([rows[i] for i in chosen]), tokenizer, spec_
    )
    examples = [
        {"input_ids": ids, "labels": labels}
        for ids, labels in zip(tokenized["input_ids"], tokenized["labels"], strict=True)
    ]
    if workload == "seq2seq":
        lengths = np.asarray(tokenized["num_source_tokens"]) + tokenized["num_target_tokens"]
    else:
        lengths = np.array([len(e["input_ids"]) for e in examples])
    longest = np.argsort(-lengths, kind="stable")[: args.micro_batch_size]
    return {
        "kind": workload,
        "model_dir": str(work / "model"),
        "train_file": str(work / "train.jsonl"),
        "prompt_template": SEED_PROMPT,
        "max_source_length": 512,
        "max_target_length": 128,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": getattr(model.config, "decoder_start_token_id", None),
        "fixed_examples": examples[:FIXED_EXAMPLES],
        "longest_examples": [examples[i] for i in longest],
        "expected_real_tokens": int(lengths.sum()),
        "about": {
            "data_source": data_source,
            "examples": count,
            "examples_available": len(rows),
            "tokenizer": tokenizer_note,
            "shape": shape,
            "model_dims": {**dims, "vocab_size": model.config.vocab_size},
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_example_median": float(np.median(lengths)),
        },
    }


# --------------------------------------------------------------------------- running
class Worker:
    """One system's process and the two pipes its turns travel on."""

    def __init__(self, system: str, spec_path: Path, work: Path) -> None:
        go_read, self.go_write = os.pipe()
        self.ready_read, ready_write = os.pipe()
        self.system, self.log = system, work / f"{system}.log"
        command = [sys.executable, str(HERE / "peer_systems.py"), "--system", system]
        command += ["--spec", str(spec_path), "--go-fd", str(go_read)]
        command += ["--ready-fd", str(ready_write)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(go_read, ready_write),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        os.close(go_read)
        os.close(ready_write)
        self.go = os.fdopen(self.go_write, "w")
        self.ready = os.fdopen(self.ready_read, "r")
        self.state = "setup"

    def receive(self) -> str:
        message = self.ready.readline().strip()
        if not message:  # the process ended without saying done: it failed
            self.process.wait()
            tail = self.log.read_text()[-3000:]
            self.state = "failed"
            print(f"{self.system} failed (exit {self.process.returncode}):\n{tail}", flush=True)
            return "failed"
        return message

    def turn(self) -> str:
        self.go.write("go\n")
        self.go.flush()
        return self.receive()


def run_systems(systems: list[str], spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    workers = [Worker(system, spec_path, work) for system in systems]
    for worker in workers:  # set up side by side (untimed); each reports at its first step
        message = worker.receive()
        if message in ("step", "skip"):
            worker.state = {"step": "training", "skip": "skipped"}[message]
    print(f"timing {', '.join(systems)}: one optimizer step each in turn", flush=True)
    turn = 0
    while training := [w for w in workers if w.state == "training"]:
        # rotate who goes first, so no system always runs right after the same other one
        for worker in training[turn % len(training) :] + training[: turn % len(training)]:
            message = worker.turn()
            if message == "end":
                worker.state = "finishing"
        turn += 1
    results = {}
    for worker in workers:
        if worker.state == "finishing" and worker.turn() == "done":
            worker.process.wait()
            results[worker.system] = json.loads((work / f"{worker.system}.json").read_text())
        elif worker.state == "skipped":
            worker.process.wait()
            results[worker.system] = json.loads((work / f"{worker.system}.json").read_text())
        elif worker.state != "failed":
            worker.process.kill()
    return results


def summarise(
    workload: str, results: dict[str, Any], spec: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    peer = PEERS[workload]
    steps_per_epoch_full = spec["about"]["examples_available"] // args.batch_size
    for result in results.values():
        result["seconds_per_step"] = result["seconds"] / args.steps
        result["seconds_per_epoch"] = result["seconds_per_step"] * steps_per_epoch_full
        result["same_real_tokens"] = result["real_tokens"] == spec["expected_real_tokens"]
    out: dict[str, Any] = {"systems": results}
    if peer in results:
        for name, result in results.items():
            if name != peer:
                ratio = result["tokens_per_second"] / results[peer]["tokens_per_second"]
                result[f"ratio_vs_{peer}"] = ratio
                if result.get("executed_tflop") and results[peer].get("executed_tflop"):
                    # the ratio if time followed matmul FLOPs, and the share of it reached
                    flop_ratio = results[peer]["executed_tflop"] / result["executed_tflop"]
                    result[f"flop_ratio_vs_{peer}"] = flop_ratio
                    result[f"ceiling_fraction_vs_{peer}"] = ratio / flop_ratio
        shipped = "clustertune" if workload == "seq2seq" else "clustertune_packed"
        if shipped in results:
            out[f"ratio_vs_{peer}"] = results[shipped][f"ratio_vs_{peer}"]
    out["about"] = {
        **spec["about"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "micro_batch_tokens": args.micro_batch_tokens,
        "steps_per_epoch_extrapolated": steps_per_epoch_full,
        "hyperparameters": spec["hyperparameters"],
    }
    return out


def run_workload(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.data != "smoke" and not (DIALOGSUM / "dialogsum.dev.jsonl").is_file():
        message = f"DialogSum not found at {DIALOGSUM}: {workload} workload skipped (--data smoke runs it on generated data)"
        print(message, flush=True)
        return {"skipped": message}
    if workload == "causal":
        try:
            import trl  # noqa: F401
        except ImportError:
            message = "the causal workload needs TRL, the `bench` extra: pip install -e '.[bench]'"
            print(message, flush=True)
            return {"skipped": message}
    systems, notes = workload_systems(workload)
    systems = [s for s in systems if not args.systems or s in args.systems]
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=args.work_dir))
    try:
        spec = prepare(workload, args, work)
        spec.update(
            work_dir=str(work),
            threads=args.threads,
            micro_batch_tokens=args.micro_batch_tokens,
            hyperparameters={
                "global_batch_size": args.batch_size,
                "micro_batch_size": args.micro_batch_size,
                "learning_rate": args.learning_rate,
                "weight_decay": 0.01,
                "max_grad_norm": 1.0,
                "seed": args.seed,
            },
        )
        results = run_systems(systems, spec, work)
        for name in systems:
            if name in results and results[name].get("skipped"):
                notes.append(f"{name} skipped: {results.pop(name)['skipped']}")
            elif name not in results:
                notes.append(f"{name} failed: see the log above")
        summary = summarise(workload, results, spec, args)
        summary["notes"] = notes
        return summary
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report
def print_table(results: dict[str, Any]) -> None:
    for workload, out in results["workloads"].items():
        if "skipped" in out:
            print(f"\n{workload}: skipped: {out['skipped']}")
            continue
        about, peer = out["about"], PEERS[workload]
        print(
            f"\n{workload}: {about['data_source']}; {about['examples']} examples = {about['steps']} "
            f"steps of {about['batch_size']} (micro {about['micro_batch_size']}); {about['shape']} "
            f"{about['parameters'] / 1e6:.1f} M params; tokenizer: {about['tokenizer'].split(':')[0]}"
        )
        header = f"{'system':<26} {'real tok/s':>10} {'pad eff':>8} {'s/step':>7} {'s/epoch':>8} {'peak RSS GiB':>12} {'loss':>7} {'vs peer':>8}"
        print(header)
        for name, r in out["systems"].items():
            ratio = r.get(f"ratio_vs_{peer}")
            print(
                f"{name:<26} {r['tokens_per_second']:>10,.0f} {r['padding_efficiency']:>8.3f} "
                f"{r['seconds_per_step']:>7.2f} {r['seconds_per_epoch']:>8.0f} "
                f"{r['peak_rss_gib']:>5.2f} ({r['peak_rss_above_imports_gib']:.2f}) "
                f"{r['final_loss_fixed_examples']:>7.3f} {'' if ratio is None else f'{ratio:.2f}x':>8}"
            )
        if f"ratio_vs_{peer}" in out:
            print(
                f"clustertune / {peer}: {out[f'ratio_vs_{peer}']:.2f}x real tokens/s (target >= 1.0)"
            )
        for note in out.get("notes", []):
            print(f"note: {note}")
    run = results["run"]
    print(f"load average (1, 5, 15 min): {run['load_before']} before, {run['load_after']} after")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["seq2seq", "causal", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 2 steps of 8: works?")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps = one epoch")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward")
    parser.add_argument(
        "--micro-batch-tokens",
        default="4096",
        help="clustertune_token_budget's train.micro_batch_tokens (default 4096 = 8 x 512: the "
        "worst-case micro-batch of 8 examples at max_source_length, so the same worst-case memory)",
    )
    parser.add_argument(
        "--causal-shape", choices=sorted(LLAMA_SHAPES), default="cpu", help="causal: Llama shape"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--systems", nargs="*", default=None, help="run only these systems")
    parser.add_argument("--work-dir", type=Path, default=None, help="for the temporary files")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    add_shared_arguments(parser, data_help="auto/dialogsum: DialogSum dev+test; smoke: generated")
    parser.set_defaults(tokenizer="dialogsum-bpe")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.batch_size, args.micro_batch_size = "tiny", 2, 8, 4
        args.causal_shape = "tiny"
        args.micro_batch_tokens = "2048"
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch-size must be a multiple of --micro-batch-size.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_libraries()
    load_before = [round(x, 2) for x in os.getloadavg()]
    workloads = ["seq2seq", "causal"] if args.workload == "all" else [args.workload]
    results: dict[str, Any] = {"workloads": {w: run_workload(w, args) for w in workloads}}
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results["run"] = {
        "quick": args.quick,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "threads": args.threads or "torch default (one per core)",
        "timing": "one process per system, one optimizer step each in turn (rotating order); "
        "every system's whole epoch is timed after one untimed forward+backward warm-up",
        **environment(device, load_before[0]),
    }
    publish(results, args.json, None, print_table)
    return results


if __name__ == "__main__":
    main()
