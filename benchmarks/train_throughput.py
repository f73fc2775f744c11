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
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    DIALOGSUM,
    SHAPES,
    add_shared_arguments,
    bar_panel,
    build_t5,
    cache_dir,
    environment,
    load_tokenizer,
    publish,
    save_figure,
    start,
)

SEED_MAX_LENGTH = 512  # the seed pads both prompt and summary to the tokenizer's 512


# --------------------------------------------------------------------------- data
def load_pairs(source: str) -> tuple[list[dict[str, str]], str]:
    """(dialogue, summary) rows and a sentence saying where they came from."""
    from clustertune.atomicio import read_jsonl
    from clustertune.smoke import ensure_smoke_assets

    dev, test = DIALOGSUM / "dialogsum.dev.jsonl", DIALOGSUM / "dialogsum.test.jsonl"
    if source in ("auto", "dialogsum") and dev.is_file() and test.is_file():
        rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in read_jsonl(dev)]
        # The official test split has three references; summary1 is the training target here.
        rows += [{"dialogue": r["dialogue"], "summary": r["summary1"]} for r in read_jsonl(test)]
        return (
            rows,
            f"DialogSum dev+test ({len(rows)} dialogues, test target = summary1) from {DIALOGSUM}",
        )
    if source == "dialogsum":
        sys.exit(f"--data dialogsum: {dev} and {test} are missing; use --data auto or smoke.")
    train = ensure_smoke_assets(cache_dir())["train"]
    rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in read_jsonl(train)]
    why = "DialogSum not found" if source == "auto" else "--data smoke"
    return rows, f"generated smoke data ({len(rows)} dialogues) from {train} ({why})"


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


# --------------------------------------------------------------------------- model and FLOPs
def t5_train_flops(config: Any, source_lengths: np.ndarray, target_lengths: np.ndarray) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) of a T5.

    Per example with S source and T target tokens, d = d_model, a = num_heads x d_kv,
    f = d_ff, V = vocab, Le / Ld encoder / decoder layers, 2 FLOPs per multiply-add:
      encoder, per layer:  S x (8 d a            q, k, v, o projections
                                + 6 d f          gated FFN: wi_0, wi_1, wo (4 d f if not gated)
                                + 4 S a)         scores QK^T and weights x V over S keys
      decoder, per layer:  T x (8 d a + 6 d f + 4 T a)   self-attention (full T x T: the causal
                                                        mask does not skip work in SDPA/eager)
                         + T x (4 d a + 4 S a)          cross-attention q, o and scores over S
                         + S x 4 d a                    cross-attention k, v of the encoder
                                                        output, per decoder layer
      head:                T x 2 d V
    Encoder weights see source tokens and decoder weights target tokens, so 6 x params x
    tokens over-counts the encoder (T << S on DialogSum) and misses attention. Layer norms,
    softmax, relative position bias and the loss are left out (not matmuls)."""
    d, a = config.d_model, config.num_heads * config.d_kv
    ffn = (6 if config.is_gated_act else 4) * config.d_model * config.d_ff
    S, T = source_lengths.astype(np.float64), target_lengths.astype(np.float64)
    encoder = config.num_layers * S * (8 * d * a + ffn + 4 * S * a)
    decoder = config.num_decoder_layers * (
        T * (8 * d * a + ffn + 4 * T * a) + T * (4 * d * a + 4 * S * a) + S * 4 * d * a
    )
    head = T * 2 * d * config.vocab_size
    return float(3 * (encoder + decoder + head).sum())


# --------------------------------------------------------------------------- the three variants
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


# --------------------------------------------------------------------------- measuring
def rss_peak_reset() -> None:
    """Release freed heap to the OS, then restart the kernel's peak-RSS counter (VmHWM)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss_now() -> int:
    return _proc_status_bytes("VmRSS")


def rss_peak() -> int:
    return _proc_status_bytes("VmHWM")


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
        help="bf16 dense peak for MFU (default on GPU: 989, H100 SXM; none on CPU)",
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
    peak_tflops = args.peak_tflops or (989.0 if device.type == "cuda" else None)

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
