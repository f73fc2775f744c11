#!/usr/bin/env python
"""DDP, ZeRO-2, ZeRO-3 and FSDP2 on 2 processes, full fine-tune and LoRA: speed, memory, start-up.

    python benchmarks/engines.py --json benchmarks/engines.json        # CPU, ~20 min
    python benchmarks/engines.py --quick --json /tmp/engines.json     # tiny model, DDP and FSDP2

Every run is the shipped recipe (recipes/finetune.py under clustertune-launch with the shipped
launch file, through benchmarks/startup_probe.py, which clocks start-up and each rank's peak
memory and changes nothing else) on the same examples, model shape, initial weights, global
batch and micro-batch: T5 'cpu-large' (~60 M parameters: the model states, 16 bytes a
parameter with Adam in fp32, ~0.9 GiB, outweigh the activations of one 128-token dialogue,
so what each engine shards shows), 2 processes x micro 1 x accumulation 4 = global batch 8,
one torch thread per process (OMP_NUM_THREADS=1). The eight runs are interleaved: each round runs all of
them, the next round in an order rotated by one, so a change in the machine's load falls on
every engine alike; the figures are the median over the rounds.

  tokens/s          real (non-pad) tokens of both ranks per second, every step but the first
  peak RSS / rank   the kernel's high-water mark of each rank's resident memory (VmHWM): model,
                    gradients, optimizer state, the engine's buffers and the Python heap. glibc
                    keeps freed heap memory for reuse, so freed tensors would still count;
                    MALLOC_MMAP_THRESHOLD_=65536 gives every tensor over 64 KiB its own mapping,
                    returned when it is freed, so the mark follows the live tensors (as a GPU's
                    max_memory_allocated does). ~0.45 GiB of it is the libraries' own.
  start-up          the command to the end of the first optimizer step; model_and_engine is
                    the part spent loading the weights and building the engine around them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from common import (
    REPO,
    add_shared_arguments,
    environment,
    load_pairs,
    load_tokenizer,
    publish,
    save_t5_folder,
)
from scaling import free_port, throughput

HERE = Path(__file__).resolve().parent
ENGINES = {"DDP": "ddp", "ZeRO-2": "zero2", "ZeRO-3": "zero3", "FSDP2": "fsdp2"}
METHODS = {"full": [], "LoRA": ["--peft.method=lora"]}
PROCESSES = 2


def run_one(
    engine: str, method: str, round_: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    name = f"{engine}_{method}_round{round_}"
    output_dir = work / name
    probe_json = work / f"{name}.startup.json"
    command = [str(Path(sys.executable).parent / "clustertune-launch")]
    command += ["--config_file", str(REPO / "launch" / f"{ENGINES[engine]}.yaml")]
    command += ["--num_processes", str(PROCESSES), "--main_process_port", str(free_port())]
    command += [
        str(HERE / "startup_probe.py"),
        f"--output_dir={output_dir}",
        "--resume=never",
        f"--model.name_or_path={work / 'model'}",
        f"--data.train_file={work / 'train.jsonl'}",
        f"--train.max_steps={args.steps}",
        f"--train.global_batch_size={args.batch_size}",
        f"--train.micro_batch_size={args.micro_batch_size}",
        f"--data.max_source_length={args.max_source_length}",
        "--train.learning_rate=1e-4",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
        *METHODS[method],
        *args.recipe_args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",  # freed tensors leave the RSS (docstring)
        "HF_DATASETS_CACHE": str(work / "datasets_cache"),
        "CT_STARTUP_JSON": str(probe_json),
        "PYTHONUNBUFFERED": "1",
        "CT_COMMAND_TIME": repr(time.time()),
    }
    load_before = round(os.getloadavg()[0], 2)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    result: dict[str, Any] = {
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
    }
    if done.returncode != 0:
        result["failed"] = (done.stdout + done.stderr)[-3000:]
        print(f"{name} failed:\n{result['failed']}", flush=True)
        return result
    result.update(throughput(output_dir / "metrics.jsonl", args.batch_size))
    startup = json.loads(probe_json.read_text())
    result["command_to_first_step_seconds"] = startup["command_to_first_step_seconds"]
    result["model_and_engine_seconds"] = startup["phases"].get("model_and_engine")
    ranks = [
        json.loads((work / f"{name}.startup.json.rank{r}").read_text()) for r in range(PROCESSES)
    ]
    result["peak_rss_bytes"] = [r["peak_rss_bytes"] for r in ranks]
    result["peak_rss_after_setup_bytes"] = [r["peak_rss_after_setup_bytes"] for r in ranks]
    shutil.rmtree(output_dir, ignore_errors=True)  # the next run must not read this one's files
    print(
        f"  {engine:<7} {method:<5} round {round_}: {result['tokens_per_second']:,.0f} tok/s, "
        f"peak {max(result['peak_rss_bytes']) / 2**30:.2f} GiB, "
        f"first step at {result['command_to_first_step_seconds']:.1f} s",
        flush=True,
    )
    return result


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rounds if "failed" not in r]
    if not good:
        return {"failed": rounds[0]["failed"]}
    gib = 2**30
    return {
        "tokens_per_second": median(r["tokens_per_second"] for r in good),
        "tokens_per_second_each_round": [round(r["tokens_per_second"], 1) for r in good],
        "seconds_per_step": median(r["seconds_per_step"] for r in good),
        "peak_rss_gib_per_rank": [
            round(median(r["peak_rss_bytes"][k] for r in good) / gib, 3) for k in range(PROCESSES)
        ],
        "peak_rss_after_setup_gib_per_rank": [
            round(median(r["peak_rss_after_setup_bytes"][k] for r in good) / gib, 3)
            for k in range(PROCESSES)
        ],
        "command_to_first_step_seconds": median(r["command_to_first_step_seconds"] for r in good),
        "model_and_engine_seconds": median(r["model_and_engine_seconds"] for r in good),
        "final_loss": good[0]["final_loss"],
        "final_loss_each_round": [r["final_loss"] for r in good],
        "load": [[r["load_before"], r["load_after"]] for r in good],
        "rounds": len(good),
    }


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['about']}")
    print(
        f"{'engine':<8} {'method':<6} {'tok/s':>7} {'vs DDP':>7} {'peak RSS/rank GiB':>18} "
        f"{'after setup':>12} {'1st step':>9} {'engine build':>13} {'final loss':>11}"
    )
    for method in results["methods"]:
        base = results["runs"].get(f"DDP {method}", {}).get("tokens_per_second")
        for engine in results["engines"]:
            r = results["runs"][f"{engine} {method}"]
            if "failed" in r:
                print(f"{engine:<8} {method:<6} failed")
                continue
            ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else ""
            peaks = "/".join(f"{g:.2f}" for g in r["peak_rss_gib_per_rank"])
            setup = "/".join(f"{g:.2f}" for g in r["peak_rss_after_setup_gib_per_rank"])
            print(
                f"{engine:<8} {method:<6} {r['tokens_per_second']:>7,.0f} {ratio:>7} {peaks:>18} "
                f"{setup:>12} {r['command_to_first_step_seconds']:>8.1f}s "
                f"{r['model_and_engine_seconds']:>12.1f}s {r['final_loss']:>11.6f}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shape, 2 steps, 1 round, DDP and FSDP2"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--max-source-length", type=int, default=128)
    parser.add_argument("--engines", nargs="*", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--recipe-args",
        nargs="*",
        default=[],
        help="more overrides for every run, e.g. --data.max_source_length=128",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    add_shared_arguments(parser, data_help="auto: DialogSum dev+test when present, else smoke data")
    parser.set_defaults(tokenizer="dialogsum-bpe", shape="cpu-large")
    args = parser.parse_args(argv)
    if args.quick:  # the script works: tiny model, 2 steps of 4, DDP and FSDP2 only
        args.shape, args.steps, args.batch_size, args.rounds = "tiny", 2, 4, 1
        args.engines = [e for e in args.engines if e in ("DDP", "FSDP2")]
    from common import quiet_libraries

    quiet_libraries()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    combos = [(engine, method) for method in args.methods for engine in args.engines]
    collected: dict[str, list[dict[str, Any]]] = {f"{e} {m}": [] for e, m in combos}
    try:
        from clustertune.atomicio import write_jsonl_atomic

        rows, data_source = load_pairs(args.data)
        write_jsonl_atomic(work / "train.jsonl", rows)
        tokenizer, tokenizer_note = load_tokenizer(
            args.tokenizer, (t for r in rows for t in (r["dialogue"], r["summary"]))
        )
        model = save_t5_folder(args.shape, tokenizer, args.seed, work / "model")
        for round_ in range(args.rounds):
            order = combos[round_ % len(combos) :] + combos[: round_ % len(combos)]
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for engine, method in order:
                collected[f"{engine} {method}"].append(run_one(engine, method, round_, args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    results: dict[str, Any] = {
        "runs": {name: summarise(rounds) for name, rounds in collected.items()},
        "engines": args.engines,
        "methods": args.methods,
        "about": (
            f"T5 '{args.shape}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
            f"random), {data_source.split(' from ')[0]}, {tokenizer_note.split(':')[0]}; "
            f"{PROCESSES} processes x 1 thread, global batch {args.batch_size}, micro "
            f"{args.micro_batch_size}, source truncated to {args.max_source_length} tokens, "
            f"{args.steps} steps, fp32, median of {args.rounds} interleaved rounds"
        ),
        **environment(torch.device("cpu"), load_start),
    }
    publish(results, args.json, None, print_table)
    return results


if __name__ == "__main__":
    main()
