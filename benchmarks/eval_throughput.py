#!/usr/bin/env python
"""Generation throughput for ROUGE: the seed's per-example loop vs batching vs clustertune's recipe.

    python benchmarks/eval_throughput.py --quick --json /tmp/eval.json       # < 1 min, CPU
    python benchmarks/eval_throughput.py --json benchmarks/eval_throughput.json \
        --plot benchmarks/eval_throughput.png                               # CPU, full
    python benchmarks/eval_throughput.py --shape flan-t5-base --json eval_gpu.json   # one GPU, bf16

One model (random weights), the same prompts, greedy decoding of exactly --max-new-tokens
tokens per example (min_new_tokens = max_new_tokens: an untrained model's EOS would otherwise
end examples at random points, so every variant now generates the same tokens; the default is
the median reference summary's length, what a trained model would write):
  loop         the seed's evaluation: one `generate` per dialogue, dataset order;
  batched      batches of --batch-size in dataset order, padded to the batch's longest prompt
               (tokenizer.pad, as DataCollatorForSeq2Seq in transformers' summarization example);
  clustertune  the evaluation recipe's batching: clustertune.evaluation.make_batches (sorted by
               prompt length, longest first), pad_prompts and generate_kwargs, as
               Evaluator.generate calls them on one process.
Prompts come from clustertune.evaluation.load_eval_set (the recipe's loading and truncation) and
are tokenised before timing. Each variant makes one untimed call first; then the calls of the
three variants are interleaved in proportion to their progress, so load from other processes
on a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    DIALOGSUM,
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


@dataclass
class Variant:
    name: str
    description: str
    calls: list[list[int]]  # example positions per generate call, in the order they run
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    seconds: float = 0.0
    done: int = 0
    real_tokens: int = 0
    padded_slots: int = 0
    generated_tokens: int = 0
    warm: bool = field(default=False)


def eval_data(source: str, max_examples: int | None) -> tuple[Any, str]:
    """The recipe's data config for DialogSum's official test split (3 references), or the
    generated smoke test split when DialogSum is absent."""
    from clustertune.config import SEED_PROMPT
    from clustertune.evaluation import EvalDataConfig
    from clustertune.smoke import ensure_smoke_assets

    test = DIALOGSUM / "dialogsum.test.jsonl"
    if source in ("auto", "dialogsum") and test.is_file():
        name = f"DialogSum official test split ({test})"
    elif source == "dialogsum":
        sys.exit(f"--data dialogsum: {test} is missing; use --data auto or smoke.")
    else:
        test = ensure_smoke_assets(cache_dir())["test"]
        name = f"generated smoke test split ({test}; {'DialogSum not found' if source == 'auto' else '--data smoke'})"
    config = EvalDataConfig(
        eval_file=str(test),
        reference_columns=["summary1", "summary2", "summary3"],
        source_column="dialogue",
        prompt_template=SEED_PROMPT,
        max_source_length=512,
        max_examples=max_examples,
    )
    return config, name


def make_variants(prompt_ids: list[list[int]], tokenizer: Any, batch_size: int) -> list[Variant]:
    from clustertune.evaluation import make_batches, pad_prompts

    lengths = [len(p) for p in prompt_ids]
    pad = tokenizer.pad_token_id

    def one(positions: list[int]) -> dict[str, torch.Tensor]:
        # the seed: tokenizer(prompt, return_tensors="pt").input_ids, no attention mask
        return {"input_ids": torch.tensor([prompt_ids[positions[0]]])}

    def hf_pad(positions: list[int]) -> dict[str, torch.Tensor]:
        return dict(
            tokenizer.pad([{"input_ids": prompt_ids[i]} for i in positions], return_tensors="pt")
        )

    def recipe(positions: list[int]) -> dict[str, torch.Tensor]:
        return pad_prompts(
            [prompt_ids[i] for i in positions], pad, side="right"
        )  # encoder-decoder: right

    return [
        Variant(
            "loop",
            "one generate per dialogue, dataset order (the seed)",
            [[i] for i in range(len(lengths))],
            one,
        ),
        Variant(
            "batched",
            f"batches of {batch_size} in dataset order, padded to the longest",
            make_batches(lengths, batch_size, sort_by_length=False),
            hf_pad,
        ),
        Variant(
            "clustertune",
            f"evaluation.make_batches sorted by length, batches of {batch_size}",
            make_batches(lengths, batch_size, sort_by_length=True),
            recipe,
        ),
    ]


def run_call(
    variant: Variant, model: Any, kwargs: dict[str, Any], device: torch.device, timed: bool
) -> None:
    positions = variant.calls[variant.done if timed else 0]
    start = time.perf_counter()
    inputs = {k: v.to(device) for k, v in variant.collate(positions).items()}
    output = model.generate(**inputs, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if not timed:
        return
    variant.seconds += time.perf_counter() - start
    variant.done += 1
    mask = inputs.get("attention_mask")
    variant.real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    variant.padded_slots += inputs["input_ids"].numel()
    variant.generated_tokens += (output.shape[1] - 1) * output.shape[0]  # minus the decoder start


def print_table(results: dict[str, Any]) -> None:
    run = results["run"]
    print(
        f"\ndata: {run['data_source']}, {run['examples']} prompts (median {run['prompt_tokens_median']:.0f} tokens, "
        f"{run['prompts_truncated']} truncated at 512)\ntokenizer: {run['tokenizer']}"
    )
    print(
        f"model: T5 '{run['shape']}' ({run['parameters'] / 1e6:.1f} M params, random weights), {run['device']} "
        f"{run['precision']}, greedy, exactly {run['max_new_tokens']} new tokens per example, batch {run['batch_size']}, "
        f"{run['machine']['torch_threads']} threads, load avg {run['load_average_start']:.1f} -> {run['load_average_end']:.1f}"
    )
    print(
        f"\n{'variant':<12} {'examples/s':>11} {'gen tok/s':>10} {'prompt pad eff':>15} {'calls':>6} {'seconds':>8}"
    )
    for name, v in results["variants"].items():
        print(
            f"{name:<12} {v['examples_per_second']:>11.2f} {v['generated_tokens_per_second']:>10,.0f} "
            f"{v['prompt_padding_efficiency']:>15.3f} {v['generate_calls']:>6} {v['seconds']:>8.1f}"
        )
    print(f"\nclustertune / loop:    {results['ratio_vs_loop']:.2f}x examples/s (target >= 3.5)")
    print(
        f"clustertune / batched: {results['ratio_vs_batched']:.2f}x examples/s (what sorting by length adds)"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    values = [results["variants"][n]["examples_per_second"] for n in names]
    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    run = results["run"]
    bar_panel(
        axis,
        names,
        values,
        f"examples / s generating {run['max_new_tokens']} tokens each, T5 '{run['shape']}', "
        f"batch {run['batch_size']}\n{run['device_name']}: clustertune {results['ratio_vs_loop']:.1f}x the loop",
    )
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shape, 24 prompts, 8 new tokens: checks the script works",
    )
    parser.add_argument("--examples", type=int, default=None, help="first N prompts (default: all)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="prompts per generate call (batched, clustertune)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated per example, exactly (default: the median length of the first "
        "reference in this tokenizer, what a trained model would write)",
    )
    add_shared_arguments(
        parser,
        data_help="auto: DialogSum's test split when ../shared/data/dialogsum exists, else smoke data",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.examples, args.max_new_tokens, args.batch_size = "tiny", 24, 8, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from clustertune.atomicio import read_jsonl
    from clustertune.evaluation import GenerationSettings, generate_kwargs, load_eval_set

    device, load_start = start(args)
    data_config, data_source = eval_data(args.data, args.examples)
    texts = (
        row[c] for row in read_jsonl(Path(data_config.eval_file)) for c in ("dialogue", "summary1")
    )
    tokenizer, tokenizer_note = load_tokenizer(args.tokenizer, texts)
    eval_set = load_eval_set(data_config, tokenizer, "seq2seq")
    prompt_ids = eval_set.prompt_ids

    if args.max_new_tokens is None:
        reference_lengths = sorted(
            len(ids)
            for ids in tokenizer(text_target=[r[0] for r in eval_set.references])["input_ids"]
        )
        args.max_new_tokens = reference_lengths[len(reference_lengths) // 2]
    model = build_t5(args.shape, tokenizer, args.seed).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens
    )
    kwargs = {**generate_kwargs(settings), "pad_token_id": tokenizer.pad_token_id}
    variants = make_variants(prompt_ids, tokenizer, args.batch_size)
    with torch.inference_mode():
        for variant in variants:
            print(f"warming up {variant.name}: {variant.description}", flush=True)
            run_call(variant, model, kwargs, device, timed=False)
        print(f"timing {len(prompt_ids)} prompts per variant, interleaved", flush=True)
        while True:
            pending = [v for v in variants if v.done < len(v.calls)]
            if not pending:
                break
            run_call(
                min(pending, key=lambda v: v.done / len(v.calls)), model, kwargs, device, timed=True
            )

    results: dict[str, Any] = {"variants": {}}
    for v in variants:
        results["variants"][v.name] = {
            "description": v.description,
            "examples_per_second": len(prompt_ids) / v.seconds,
            "generated_tokens_per_second": v.generated_tokens / v.seconds,
            "seconds": v.seconds,
            "generate_calls": len(v.calls),
            "prompt_padding_efficiency": v.real_tokens / v.padded_slots,
        }
    eps = {name: v["examples_per_second"] for name, v in results["variants"].items()}
    results["ratio_vs_loop"] = eps["clustertune"] / eps["loop"]
    results["ratio_vs_batched"] = eps["clustertune"] / eps["batched"]
    lengths = sorted(len(p) for p in prompt_ids)
    results["run"] = {
        "quick": args.quick,
        "data_source": data_source,
        "examples": len(prompt_ids),
        "prompt_tokens_median": float(lengths[len(lengths) // 2]),
        "prompts_truncated": eval_set.num_truncated,
        "tokenizer": tokenizer_note,
        "shape": args.shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "generation": kwargs,
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "timing": "one untimed call per variant, then generate calls interleaved in proportion to progress",
        **environment(device, load_start),
    }
    publish(results, args.json, args.plot, print_table, plot)
    return results


if __name__ == "__main__":
    main()
