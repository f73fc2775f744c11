#!/usr/bin/env python
"""Training throughput: the seed tutorial's batching vs the transformers example's vs clustertune.

    python benchmarks/train_throughput.py --quick --json /tmp/train.json     # < 1 min, CPU
    python benchmarks/train_throughput.py --json benchmarks/train_throughput.json \
        --plot benchmarks/train_throughput.png                               # CPU, full
    python benchmarks/train_throughput.py --shape flan-t5-base --batch-size 64 \
        --micro-batch-size 16 --steps 12 --warmup-steps 2 --json train_gpu.json    # one GPU, bf16

One process trains the same randomly initialised T5 on the same examples for the same number
of optimizer steps (AdamW, gradient clipping at 1.0; fp32 on CPU, bf16 autocast on GPU):
  seed         the seed tutorial: every example padded to 512 tokens on both sides, labels
               padded with the pad id (it trains on padding: the model's mean loss over all 512
               label slots), no attention mask (the tutorial keeps only input_ids and labels),
               random order;
  hf_example   transformers' run_summarization.py: DataCollatorForSeq2Seq (dynamic padding to
               the longest example of the batch, labels padded with -100), random order;
  clustertune  the shipped pipeline: GlobalBatchPlan length-grouped global batches,
               data.Collator, train.token_loss_sum divided by the global batch's target tokens.
The examples are those of `steps` of clustertune's global batches for epoch 0, evenly spaced
in size (seconds per epoch is extrapolated from them); the baselines shuffle the same examples
into random batches, so every variant processes exactly the same real tokens and the tokens/s
ratios are inverse time ratios. Warm-up steps repeat the variant's largest steps (memory is
measured then) and are not timed; the timed steps of the three variants are interleaved. Examples are held as token-id lists in
memory; collation is timed, as in a DataLoader with num_workers=0. Padding efficiency and
matmul FLOPs are also computed (no training) over the whole epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    SHAPES,
    add_shared_arguments,
    bar_panel,
    build_t5,
    environment,
    load_pairs,
    load_tokenizer,
    publish,
    save_figure,
    start,
)
from flops import peak_bf16_tflops
from train_variants import (
    SEED_MAX_LENGTH,
    Runner,
    executed_train_flops,
    make_variants,
    padding_stats,
    stratified_sample,
)


# --------------------------------------------------------------------------- data
def tokenize(rows: list[dict[str, str]], tokenizer: Any) -> Any:
    import datasets

    from clustertune import data as data_lib
    from clustertune.config import SEED_PROMPT

    # 512/128: what clustertune's flan_t5_base config keeps; the seed truncates at 512 too.
    spec = data_lib.TokenizeSpec("seq2seq", SEED_PROMPT, "summary", SEED_MAX_LENGTH, 128)
    return data_lib.tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, spec)


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(lengths)),
        "mean": round(float(lengths.mean()), 1),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


# --------------------------------------------------------------------------- report
def print_table(results: dict[str, Any]) -> None:
    run, variants = results["run"], results["variants"]
    print(f"\ndata: {run['data_source']}\ntokenizer: {run['tokenizer']}")
    print(
        f"token lengths (this tokenizer): source median {run['source_tokens']['median']:.0f} "
        f"(p90 {run['source_tokens']['p90']:.0f}), target median {run['target_tokens']['median']:.0f} "
        f"(p90 {run['target_tokens']['p90']:.0f}); {run['sources_truncated']} prompts truncated at 512"
    )
    print(
        f"model: T5 '{run['shape']}' ({run['parameters'] / 1e6:.1f} M params, random weights), "
        f"{run['device']} {run['precision']}, batch {run['batch_size']} (micro {run['micro_batch_size']}), "
        f"{run['steps']} timed steps after {run['warmup_steps']} warm-up, load avg {run['load_average_start']:.1f} -> {run['load_average_end']:.1f}"
    )
    mfu = any("mfu" in v for v in variants.values())
    header = f"{'variant':<12} {'real tok/s':>11} {'pad eff':>8} {'pad eff (epoch)':>15} {'s/epoch':>9} {'s/step':>8} {'mem GiB':>8} {'TFLOP/s':>8}"
    print("\n" + header + (f" {'MFU':>6}" if mfu else ""))
    for name, v in variants.items():
        line = (
            f"{name:<12} {v['tokens_per_second']:>11,.0f} {v['padding_efficiency']:>8.3f} "
            f"{v['padding_efficiency_epoch']:>15.3f} {v['seconds_per_epoch']:>9.1f} {v['seconds_per_step']:>8.3f} "
            f"{v['peak_memory_gib']:>8.2f} {v['model_tflops_per_second']:>8.3f}"
        )
        print(line + (f" {v['mfu']:>6.1%}" if mfu else ""))
    print(
        f"\nclustertune / seed:       {results['ratio_vs_seed']:.2f}x real tokens/s (target >= 12)"
    )
    print(
        f"clustertune / hf_example: {results['ratio_vs_hf_example']:.2f}x real tokens/s (target >= 2.5)"
    )
    print(
        f"clustertune padding efficiency over the epoch: {results['padding_efficiency']:.3f} (target >= 0.97)"
    )
    print(
        f"matmul FLOPs per epoch: clustertune needs {results['flop_ratio_vs_seed']:.2f}x fewer than seed, "
        f"{results['flop_ratio_vs_hf_example']:.2f}x fewer than hf_example (the ratios if time followed FLOPs)"
    )
    print(
        f"ceiling fraction (ratio / FLOP ratio): {results['ceiling_fraction_vs_seed']:.2f} vs seed "
        f"(target >= 0.95 on an idle machine), {results['ceiling_fraction_vs_hf_example']:.2f} vs hf_example"
    )
    print(f"peak memory: {run['memory_note']}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    variants = [results["variants"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [
        ("tokens_per_second", "real (non-pad) tokens / s"),
        ("padding_efficiency_epoch", "padding efficiency"),
        ("seconds_per_epoch", "seconds per epoch"),
    ]
    for axis, (key, title) in zip(axes, panels, strict=True):
        bar_panel(axis, names, [v[key] for v in variants], title)
    run = results["run"]
    fig.suptitle(
        f"T5 '{run['shape']}' training on {run['data_name']}, {run['device_name']}, batch {run['batch_size']}: "
        f"clustertune {results['ratio_vs_seed']:.1f}x seed, {results['ratio_vs_hf_example']:.1f}x HF example",
        fontsize=10,
    )
    save_figure(fig, path)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shape, batch 4, 2 timed steps: checks the script works (< 1 min), measures little",
    )
    # 8 per forward: the seed's and the HF example's per-device default, and clustertune's
    # flan_t5_base micro_batch_size; 32 per step = 4 accumulated micro-batches.
    parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per optimizer step, every variant"
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=8, help="examples per forward, every variant"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="untimed optimizer steps before timing"
    )
    parser.add_argument(
        "--length-group-size",
        type=int,
        default=None,
        help="clustertune's data.length_group_size (default: the shipped default)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 dense peak for MFU (default on GPU: the card's, from flops.PEAK_BF16_TFLOPS; none on CPU)",
    )
    add_shared_arguments(
        parser,
        data_help="auto: DialogSum dev+test when ../shared/data/dialogsum exists, else smoke data",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.batch_size, args.micro_batch_size, args.steps, args.warmup_steps = (
            "tiny",
            4,
            4,
            2,
            1,
        )
    if args.batch_size % args.micro_batch_size:
        parser.error(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {args.micro_batch_size}."
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from clustertune.config import DataConfig
    from clustertune.sampler import GlobalBatchPlan

    device, load_start = start(args)
    peak_tflops = args.peak_tflops or (
        peak_bf16_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    )

    rows, data_source = load_pairs(args.data)
    tokenizer, tokenizer_note = load_tokenizer(
        args.tokenizer, (t for r in rows for t in (r["dialogue"], r["summary"]))
    )
    train = tokenize(rows, tokenizer)
    source_lengths = np.asarray(train["num_source_tokens"])
    target_lengths = np.asarray(train["num_target_tokens"])
    length_group_size = args.length_group_size or DataConfig.length_group_size
    plan = GlobalBatchPlan(
        source_lengths,
        target_lengths,
        args.batch_size,
        args.micro_batch_size,
        world_size=1,
        rank=0,
        seed=args.seed,
        length_group_size=length_group_size,
    )
    epoch_batches = plan.global_batches(0)
    if args.steps > len(epoch_batches):
        sys.exit(
            f"--steps {args.steps} exceeds one epoch ({len(epoch_batches)} steps of batch {args.batch_size}); lower it."
        )
    timed_batches = stratified_sample(epoch_batches, args.steps, source_lengths + target_lengths)

    def build() -> Any:
        return build_t5(
            args.shape, tokenizer, args.seed
        )  # every variant starts from the same weights

    # The HF collator builds decoder_input_ids with the model's shift-right (config only).
    reference_model = build()
    variants = make_variants(
        train, tokenizer, plan, timed_batches, args.micro_batch_size, args.seed, reference_model
    )
    # The same variants over a whole epoch, for the epoch's padding efficiency (no training).
    epoch_variants = make_variants(
        train, tokenizer, plan, epoch_batches, args.micro_batch_size, args.seed, reference_model
    )
    # Warm-up one variant at a time, smallest memory first (each one's memory is measured
    # during its own warm-up, and heap kept by a bigger predecessor would hide its growth).
    runners = []
    for variant in reversed(variants):
        print(f"warming up {variant.name}: {variant.description}", flush=True)
        runner = Runner(variant, build, device)
        runner.warm_up(args.warmup_steps)
        runners.append(runner)
    # Timed steps round-robin over the variants, rotating who goes first: load from other
    # processes (a shared machine) then falls on all of them alike, not on whoever ran last.
    print(f"timing {args.steps} steps per variant, interleaved", flush=True)
    for round_index in range(args.steps):
        for k in range(len(runners)):
            runners[(round_index + k) % len(runners)].timed_step()
    results: dict[str, Any] = {"variants": {}}
    for variant, whole_epoch in zip(variants, epoch_variants, strict=True):
        runner = next(r for r in runners if r.variant is variant)
        result = runner.result(source_lengths, target_lengths, peak_tflops)
        real, slots = padding_stats(whole_epoch, whole_epoch.steps, source_lengths, target_lengths)
        result["padding_efficiency_epoch"] = real / slots
        result["seconds_per_epoch"] = result["seconds_per_step"] * plan.steps_per_epoch
        result["executed_tflop_per_epoch"] = (
            executed_train_flops(whole_epoch, reference_model.config) / 1e12
        )
        results["variants"][variant.name] = result
        runner.close()
    tps = {name: v["tokens_per_second"] for name, v in results["variants"].items()}
    results["ratio_vs_seed"] = tps["clustertune"] / tps["seed"]
    results["ratio_vs_hf_example"] = tps["clustertune"] / tps["hf_example"]
    results["padding_efficiency"] = results["variants"]["clustertune"]["padding_efficiency_epoch"]
    # What the ratios would be if step time were proportional to matmul FLOPs (noise-free).
    flop = {name: v["executed_tflop_per_epoch"] for name, v in results["variants"].items()}
    results["flop_ratio_vs_seed"] = flop["seed"] / flop["clustertune"]
    results["flop_ratio_vs_hf_example"] = flop["hf_example"] / flop["clustertune"]
    # The share of that ceiling reached: 1.0 = exactly as fast as the FLOPs saved predict.
    results["ceiling_fraction_vs_seed"] = results["ratio_vs_seed"] / results["flop_ratio_vs_seed"]
    results["ceiling_fraction_vs_hf_example"] = (
        results["ratio_vs_hf_example"] / results["flop_ratio_vs_hf_example"]
    )
    results["run"] = {
        "quick": args.quick,
        "data_source": data_source,
        "data_name": "DialogSum dev+test" if data_source.startswith("DialogSum") else "smoke data",
        "examples": len(rows),
        "tokenizer": tokenizer_note,
        "source_tokens": length_summary(source_lengths),
        "target_tokens": length_summary(target_lengths),
        "sources_truncated": int(sum(train["source_truncated"])),
        "targets_truncated": int(sum(train["target_truncated"])),
        "shape": args.shape,
        "model_dims": {**SHAPES[args.shape], "vocab_size": reference_model.config.vocab_size},
        "parameters": sum(p.numel() for p in reference_model.parameters()),
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "length_group_size": length_group_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "optimizer": "AdamW lr 1e-4, weight decay 0.01, clip 1.0",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "peak_tflops": peak_tflops,
        "memory_note": (
            "torch.cuda.max_memory_allocated during the variant's warm-up (on its largest steps), "
            "minus what was allocated before its model was built"
            if device.type == "cuda"
            else "peak RSS (VmHWM, reset per variant) during the variant's warm-up (on its largest steps) "
            "minus RSS before its model was built: its weights, AdamW state, gradients and "
            "activations; RSS is process-wide, so allocator effects blur it"
        ),
        "timing": "warm-up per variant alone, then timed steps interleaved round-robin across the variants",
        **environment(device, load_start),
    }
    publish(results, args.json, args.plot, print_table, plot)
    return results


if __name__ == "__main__":
    main()
