"""What `train.micro_batch_size: auto` probes with: the worst-case batch the data can produce,
and a fresh model + optimizer (+ DeepSpeed engine for that micro-batch) per candidate.

The search itself (doubling, bisection, all ranks agreeing, the cache) is autobatch.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from clustertune.autobatch import (
    Prober,
    ProbeSteps,
    SearchResult,
    cache_key,
    cached_search,
    choose_micro_batch,
    device_description,
    margin_applied,
)
from clustertune.config import FinetuneConfig
from clustertune.data import IGNORE_INDEX, Collator, column
from clustertune.deepspeed_config import fill_hidden_size_autos, fill_optimizer_autos
from clustertune.distributed import all_ranks_agree
from clustertune.fsdp import shard_model
from clustertune.modeling import build_model
from clustertune.optim import build_optimizer, token_loss_sum
from clustertune.run_folder import RunFolder
from clustertune.runtime import Runtime


def worst_case_batch(
    worst: dict[str, int], tokenizer: Any, collator: Collator, kind: str, device: Any
) -> Callable[[int], dict[str, torch.Tensor]]:
    """m copies of the longest source with the longest target: the largest batch the
    pipeline can ever produce for micro-batch m."""
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(3, vocab, (worst["source_tokens"],), generator=generator).tolist()
    target = torch.randint(3, vocab, (worst["target_tokens"],), generator=generator).tolist()
    source[-1] = target[-1] = eos
    if kind == "causal":
        example = {"input_ids": source + target, "labels": [IGNORE_INDEX] * len(source) + target}
    else:
        example = {"input_ids": source, "labels": target}

    def make(micro_batch_size: int) -> dict[str, torch.Tensor]:
        batch = collator([example] * micro_batch_size)
        return {k: v.to(device) for k, v in batch.items()}

    return make


def training_probe(
    cfg: FinetuneConfig, runtime: Runtime, vocab_size: int | None = None
) -> Callable[[int], ProbeSteps]:
    """build(m) -> (forward_backward, optimizer_step, cleanup) on a freshly built model."""
    kind = runtime.kind

    def build(micro_batch_size: int) -> ProbeSteps:
        model = build_model(cfg.model, cfg.peft, runtime.model_config, vocab_size)
        if runtime.is_deepspeed:
            import deepspeed

            ds_config = runtime.deepspeed_config(
                micro_batch_size=micro_batch_size,
                grad_accum_steps=1,
                max_grad_norm=cfg.train.max_grad_norm,
            )
            ds_config = fill_hidden_size_autos(ds_config, runtime.model_config)
            fill_optimizer_autos(ds_config, cfg.train)  # the optimizer the run will build
            ds_config.pop("scheduler", None)  # a schedule holds no memory; its length is unknown
            optimizer = build_optimizer(model, cfg.train, ds_config)
            if isinstance(optimizer, torch.optim.Optimizer):
                ds_config["zero_allow_untested_optimizer"] = True
                built = dict(optimizer=optimizer)
            else:  # DummyOptim: DeepSpeed builds the JSON's optimizer from these groups
                built = dict(model_parameters=optimizer.params)
            engine, *_ = deepspeed.initialize(model=model, config=ds_config, **built)

            def forward_backward(batch: dict[str, torch.Tensor]) -> None:
                engine.backward(token_loss_sum(engine, batch, kind) / batch["labels"].numel())

            return forward_backward, engine.step, engine.destroy
        if runtime.fsdp is not None:  # sharded as the run shards it: its memory per rank
            model = shard_model(model, runtime.fsdp, runtime.dtype)
            optimizer = build_optimizer(model, cfg.train, None)

            def sharded_forward_backward(batch: dict[str, torch.Tensor]) -> None:
                # collective (all-gathers, reduce-scatters), as a ZeRO engine's probe is
                (token_loss_sum(model, batch, kind) / batch["labels"].numel()).backward()

            return sharded_forward_backward, optimizer.step, lambda: None
        optimizer = build_optimizer(model, cfg.train, None)
        model.to(runtime.device)

        def local_forward_backward(batch: dict[str, torch.Tensor]) -> None:
            # No DDP wrapper here: the probe stays free of collectives, so a rank that runs out
            # of memory cannot leave the others waiting inside an all-reduce.
            (token_loss_sum(model, batch, kind) / batch["labels"].numel()).backward()

        return local_forward_backward, optimizer.step, lambda: None

    return build


def find_micro_batch(
    cfg: FinetuneConfig,
    runtime: Runtime,
    tokenizer: Any,
    collator: Collator,
    train_data: Any,
    *,
    tokens: bool = False,
) -> SearchResult:
    """The largest micro-batch that fits (every rank agrees), then the margin and the global
    batch applied: micro x accum x world stays train.global_batch_size.

    tokens (train.micro_batch_tokens: auto): the same search over rows of the worst-case
    example (one packed row of m of them with packing); the budget chosen is the margin's
    rows x that example's tokens, and no micro-batch the budget admits is larger: padded,
    rows x longest <= budget; packed, one row of at most the budget."""
    train_cfg, world_size = cfg.train, runtime.world_size
    worst = {
        "source_tokens": int(column(train_data, "num_source_tokens").max()),
        "target_tokens": int(column(train_data, "num_target_tokens").max()),
    }
    key = cache_key(
        device=device_description(),
        model=cfg.model.name_or_path,
        model_config=runtime.model_config.to_json_string(),
        worst_case=worst,
        dtype=runtime.dtype,
        peft=dataclasses.asdict(cfg.peft),
        deepspeed=runtime.deepspeed_template,
        fsdp=dataclasses.asdict(runtime.fsdp) if runtime.fsdp else None,
        world_size=world_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        kind=runtime.kind,
        packing=cfg.data.packing,
    )
    make_batch = worst_case_batch(worst, tokenizer, collator, runtime.kind, runtime.device)
    prober = Prober(
        training_probe(cfg, runtime, len(tokenizer)),
        make_batch,
        runtime.process_index,
        all_ranks_agree,
    )
    global_batch_size = train_cfg.global_batch_size
    example_tokens = worst["source_tokens"] + worst["target_tokens"]  # its cost, either kind

    def choose(largest: int) -> tuple[int, int, str]:
        if tokens:
            if largest == 0:
                choose_micro_batch(largest, global_batch_size, world_size, 0.0)  # raises
            rows = margin_applied(largest, train_cfg.auto_batch_margin)
            note = (
                f"counted in rows of the worst-case example ({example_tokens} tokens): the "
                f"budget is {rows} rows x {example_tokens} tokens"
            )
            return rows * example_tokens, 0, note
        chosen, note = choose_micro_batch(
            largest, global_batch_size, world_size, train_cfg.auto_batch_margin
        )
        return chosen, global_batch_size // (chosen * world_size), note

    # the upper bound: one rank's share of the global batch (accumulation 1)
    result = cached_search(
        prober,
        max(1, global_batch_size // world_size),
        RunFolder(runtime.output_dir).auto_batch_cache(tokens),
        key,
        runtime.is_main,
        choose=choose,
        worst_case_shape=worst,
    )
    detail = (
        ""
        if tokens
        else f", grad_accum_steps {result.grad_accum_steps} for global_batch_size {global_batch_size}"
    )
    runtime.log(
        result.log_line(
            "micro-batch tokens" if tokens else "micro-batch", train_cfg.auto_batch_margin, detail
        )
    )
    return result
