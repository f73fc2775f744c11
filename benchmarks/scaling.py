#!/usr/bin/env python
"""1 vs 2 processes (DDP, ZeRO-2) at the same global batch, and what start-up costs.

    python benchmarks/scaling.py --json benchmarks/scaling.json      # CPU, ~6-8 min
    python benchmarks/scaling.py --quick --json /tmp/scaling.json   # tiny model: works?

Every run is the shipped recipe (recipes/finetune.py under clustertune-launch, through
benchmarks/startup_probe.py, which clocks the start-up phases and changes nothing else) on the
same data, model shape and initial weights, global batch and micro-batch (grad accumulation
makes up the difference: 1 process x micro 8 x accum 4 = 2 x 8 x 2 = 32). One torch thread
per process (OMP_NUM_THREADS=1), so 2 processes use 2 cores where 1 uses one; "1 process,
2 threads" gives the second core to intra-op threads instead. Throughput is the real
(non-pad) tokens per second of all ranks, from metrics.jsonl (one record per step), over
every step but the first.

Runs, in this order: 1 process with an empty datasets cache (tokenisation cache miss), then
with the cache filled (hit); 1 process with 2 threads; 2 processes DDP; 2 processes ZeRO-2;
1 process ZeRO-2 (engine overhead without a second rank). The runs cannot share their steps the way peers.py's
systems do, so the load average before and after each is recorded.
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
from typing import Any

import numpy as np
from common import (
    REPO,
    add_shared_arguments,
    environment,
    load_pairs,
    load_tokenizer,
    publish,
    save_t5_folder,
)

HERE = Path(__file__).resolve().parent
RUNS = [  # name, launch file, processes, threads per process, fresh datasets cache
    ("1 process, cache miss", "single_gpu", 1, 1, True),
    ("1 process", "single_gpu", 1, 1, False),
    ("1 process, 2 threads", "single_gpu", 1, 2, False),
    ("2 processes DDP", "ddp", 2, 1, False),
    ("2 processes ZeRO-2", "zero2", 2, 1, False),
    ("1 process ZeRO-2", "zero2", 1, 1, False),
]
PHASES = [
    "imports",
    "import_deepspeed",
    "config",
    "process_group",
    "tokenizer",
    "data",
    "batching",
    "accelerator",
    "model_and_engine",
    "deepspeed_op_build",
    "first_step",
]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def recipe_args(args: argparse.Namespace, work: Path, output_dir: Path) -> list[str]:
    return [
        f"--output_dir={output_dir}",
        "--resume=never",
        f"--model.name_or_path={work / 'model'}",
        f"--data.train_file={work / 'train.jsonl'}",
        f"--train.max_steps={args.steps}",
        f"--train.global_batch_size={args.batch_size}",
        f"--train.micro_batch_size={args.micro_batch_size}",
        "--train.learning_rate=1e-4",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
    ]


def throughput(metrics: Path, global_batch_size: int) -> dict[str, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "samples_per_second" in r]
    seconds = np.array([global_batch_size / r["samples_per_second"] for r in steps])
    tokens = np.array([r["tokens_per_second"] for r in steps]) * seconds
    timed = slice(1, None) if len(steps) > 1 else slice(None)  # the first step warms up
    return {
        "tokens_per_second": float(tokens[timed].sum() / seconds[timed].sum()),
        "seconds_per_step": float(seconds[timed].mean()),
        "first_step_seconds": float(seconds[0]),
        "steps": len(steps),
        "final_loss": steps[-1]["loss"],
        "padding_efficiency": float(np.mean([r["padding_efficiency"] for r in steps])),
    }


def run_one(
    name: str,
    launch: str,
    processes: int,
    threads: int,
    fresh_cache: bool,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    output_dir = work / name.replace(" ", "_").replace(",", "")
    startup_json = work / f"{output_dir.name}.startup.json"
    cache = work / "datasets_cache"  # shared by the runs: only a fresh one misses
    if fresh_cache:
        shutil.rmtree(cache, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "clustertune-launch")]
    command += ["--config_file", str(REPO / "launch" / f"{launch}.yaml")]
    command += ["--num_processes", str(processes)]
    if processes > 1:
        command += ["--main_process_port", str(free_port())]
    command += [str(HERE / "startup_probe.py"), *recipe_args(args, work, output_dir)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_DATASETS_CACHE": str(cache),
        "CT_STARTUP_JSON": str(startup_json),
        "PYTHONUNBUFFERED": "1",
    }
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"{name}: {processes} x {threads} threads, launch/{launch}.yaml", flush=True)
    env["CT_COMMAND_TIME"] = repr(time.time())
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    result: dict[str, Any] = {
        "launch": f"launch/{launch}.yaml",
        "processes": processes,
        "threads_per_process": threads,
        "datasets_cache": "empty (miss)" if fresh_cache else "filled (hit)",
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(command[:6] + ["benchmarks/startup_probe.py", "..."]),
    }
    if done.returncode != 0:
        result["failed"] = (done.stdout + done.stderr)[-3000:]
        print(f"{name} failed:\n{result['failed']}", flush=True)
        return result
    result.update(throughput(output_dir / "metrics.jsonl", args.batch_size))
    result["startup"] = json.loads(startup_json.read_text())
    return result


def print_table(results: dict[str, Any]) -> None:
    runs = results["runs"]
    print(f"\n{results['about']}")
    print(
        f"{'run':<24} {'real tok/s':>10} {'s/step':>7} {'vs 1 proc':>9} {'to 1st step':>11}  load"
    )
    base = runs.get("1 process", {}).get("tokens_per_second")
    for name, r in runs.items():
        if "failed" in r:
            print(f"{name:<24} failed")
            continue
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else ""
        print(
            f"{name:<24} {r['tokens_per_second']:>10,.0f} {r['seconds_per_step']:>7.2f} {ratio:>9} "
            f"{r['startup']['command_to_first_step_seconds']:>10.1f}s  {r['load_before'][0]}->{r['load_after'][0]}"
        )
    print("\nstart-up, seconds (main process): launcher = command to the probe's first line")
    names = [n for n in runs if "startup" in runs[n]]
    print(f"{'phase':<20}" + "".join(f"{n[:22]:>24}" for n in names))
    for phase in ["launcher", *PHASES]:
        row = []
        for n in names:
            s = runs[n]["startup"]
            value = s["launcher_seconds"] if phase == "launcher" else s["phases"].get(phase)
            row.append(f"{value:>24.2f}" if value is not None else f"{'-':>24}")
        print(f"{phase:<20}" + "".join(row))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 3 steps of 8")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--runs", nargs="*", default=None, help="only these runs (by name)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    add_shared_arguments(parser, data_help="auto: DialogSum dev+test when present, else smoke data")
    parser.set_defaults(tokenizer="dialogsum-bpe")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.batch_size, args.micro_batch_size = "tiny", 3, 8, 4
    from common import quiet_libraries

    quiet_libraries()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    try:
        from clustertune.atomicio import write_jsonl_atomic

        rows, data_source = load_pairs(args.data)
        write_jsonl_atomic(work / "train.jsonl", rows)
        tokenizer, tokenizer_note = load_tokenizer(
            args.tokenizer, (t for r in rows for t in (r["dialogue"], r["summary"]))
        )
        model = save_t5_folder(args.shape, tokenizer, args.seed, work / "model")
        runs = {}
        for name, launch, processes, threads, fresh in RUNS:
            if not args.runs or name in args.runs:
                runs[name] = run_one(name, launch, processes, threads, fresh, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    results: dict[str, Any] = {
        "runs": runs,
        "about": (
            f"T5 '{args.shape}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, random), "
            f"{data_source.split(' from ')[0]}, {tokenizer_note.split(':')[0]}; global batch "
            f"{args.batch_size}, micro {args.micro_batch_size}, {args.steps} steps, fp32"
        ),
        **environment(torch.device("cpu"), load_start),
    }
    base = runs.get("1 process", {}).get("tokens_per_second")
    for r in runs.values():
        if base and "tokens_per_second" in r:
            r["ratio_vs_1_process"] = r["tokens_per_second"] / base
    publish(results, args.json, None, print_table)
    return results


if __name__ == "__main__":
    main()
