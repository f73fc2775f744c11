"""Memory planner: model-state memory per GPU under DDP, ZeRO 1/2/3 (+offload) and FSDP2
(+offload), and the launch file to use. Runs on a laptop: no GPU, no download (the model is
built on the meta device).

    python recipes/plan.py --config recipes/configs/flan_t5_base/full.yaml \
        --gpus-per-node 8 --nodes 1 --gpu-memory-gib 80 [--section.key=value ...] [--json plan.json]

Model states = weights + gradients + optimizer states (+ the layer ZeRO-3 gathers, the groups
FSDP2 gathers; FSDP2's arithmetic is clustertune.plan_fsdp).
Activations are not estimated: they depend on batch and sequence length, which
`train.micro_batch_size: auto` measures on the real GPU. The planner leaves room for them by
the headroom rule below and recommends the fastest strategy whose states fit it. The report
and the command line are clustertune.plan_cli.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.config import FinetuneConfig, PeftConfig
from clustertune.errors import UserError
from clustertune.modeling import (
    T5_FAMILY,
    apply_lora,
    count_parameters,
    load_model_config,
    model_kind,
    resolve_dtype,
    supports_zero3_init,
)
from clustertune.plan_fsdp import ShardGroups, count_shard_groups, fsdp2_bytes
from clustertune.sampler import check_batch_arithmetic

GIB = 2**30
# Headroom rule: model states may use at most 60% of a GPU; the other 40% is for activations,
# the CUDA context (~0.5-1 GiB), NCCL and DeepSpeed communication buckets, and allocator
# fragmentation. E.g. 80 GiB card: states <= 48 GiB, >= 32 GiB left for activations.
MAX_STATE_SHARE = 0.6
# DeepSpeed's own default slack for CPU memory (pinned buffers, fragmentation).
ADDITIONAL_BUFFER_FACTOR = 1.5

# Config dicts of the checkpoints the shipped recipes/configs name (the shape keys of their
# config.json), so the planner works offline for these ids.
# FLAN-T5: gated-GELU T5 v1.1 with an untied lm_head; 32,128-token vocabulary.
_FLAN_T5 = dict(
    model_type="t5",
    vocab_size=32128,
    d_kv=64,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "google/flan-t5-small": dict(_FLAN_T5, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "google/flan-t5-base": dict(_FLAN_T5, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "google/flan-t5-large": dict(_FLAN_T5, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "google/flan-t5-xl": dict(_FLAN_T5, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    # Qwen3-0.6B: 151,936 x 1,024 embedding tied to the head + 28 layers x 15,730,944
    # (q 1,024 x 2,048, k and v 1,024 x 1,024, o 2,048 x 1,024, q/k norms 2 x 128, SwiGLU
    # 3 x 1,024 x 3,072, 2 norms of 1,024) + final norm 1,024 = 596,049,920.
    "Qwen/Qwen3-0.6B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-0.5B(-Instruct): 151,936 x 896 tied + 24 layers x 14,912,384 (q, k, v with
    # biases; 2 key-value heads of 64) + 896 = 494,032,768.
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class Strategy:
    key: str
    label: str
    launch_file: str | None  # None: no launch file ships for it
    zero_stage: int | None  # DeepSpeed's ZeRO stage, 0 for DDP; None: not DeepSpeed (FSDP2)
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def fsdp2(self) -> bool:
        return self.zero_stage is None


# Fastest first (the order the HF DeepSpeed guide gives: DDP > ZeRO-1 > ZeRO-2 > ZeRO-2 +
# offload > ZeRO-3 > ZeRO-3 + offloads); the recommendation is the first row that fits.
# FSDP2 (full shard, parameters freed after each block's forward) moves what ZeRO-3 moves:
# every block's weights all-gathered in forward and again in backward, gradients
# reduce-scattered, 3 x the weight bytes per step against ZeRO-2's 2 x (reduce-scatter +
# all-gather of the updated shards); so it comes after ZeRO-2. It comes before ZeRO-3: for the
# same traffic it holds less (a full fine-tune shards 16 B/param against ZeRO-3's 18,
# clustertune.plan_fsdp) and starts without JIT-building DeepSpeed ops. Where a step
# accumulates micro-batches FSDP2 also keeps the unsharded fp32 gradients (4 B/param), and
# ZeRO-3 is then the one that fits first.
# FSDP2 + offload comes last: its optimizer step is torch's AdamW on CPU tensors, the
# per-parameter loop (torch's foreach and fused kernels take GPU tensors only), where
# ZeRO-Offload runs DeepSpeed's vectorised CPU Adam; both copy each block's weights to the
# GPU in forward and backward.
STRATEGIES = (
    Strategy("ddp", "DDP", "launch/ddp.yaml", 0),
    Strategy("zero1", "ZeRO-1", "launch/zero1.yaml", 1),
    Strategy("zero2", "ZeRO-2", "launch/zero2.yaml", 2),
    Strategy("zero2_offload", "ZeRO-2 + offload optimizer", None, 2, offload_optimizer=True),
    Strategy("fsdp2", "FSDP2", "launch/fsdp2.yaml", None),
    Strategy("zero3", "ZeRO-3", "launch/zero3.yaml", 3),
    Strategy(
        "zero3_offload_optimizer", "ZeRO-3 + offload optimizer", None, 3, offload_optimizer=True
    ),
    Strategy(
        "zero3_offload",
        "ZeRO-3 + offload optimizer+params",
        "launch/zero3_offload.yaml",
        3,
        offload_optimizer=True,
        offload_params=True,
    ),
    Strategy(
        "fsdp2_offload",
        "FSDP2 + offload params+optimizer",
        "launch/fsdp2_offload.yaml",
        None,
        offload_optimizer=True,
        offload_params=True,
    ),
)
SINGLE_GPU = Strategy("single_gpu", "single GPU (no DDP)", "launch/single_gpu.yaml", 0)


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    gpu_memory_gib: float
    cpu_memory_gib: float | None = None  # per node; None: not checked

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class ParamCounts:
    total: int  # distinct parameters, the head counted apart when the checkpoint has its own
    trainable: int
    largest_layer: int  # the largest single module's own parameters (ZeRO-3 gathers one at a time)
    largest_layer_name: str


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    gpu_bytes: int
    cpu_bytes_per_node: int
    source: str  # "deepspeed" (its estimator) or "formula" (below, and plan_fsdp)
    fits: bool
    # FSDP2 without offload: the fp32 shards and one whole group on each GPU while
    # fully_shard shards the model; a row fits only if this fits the GPU too. 0: no such
    # start-up peak is counted.
    startup_gpu_bytes: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    model_source: str
    method: str  # none | lora
    precision: str
    counts: ParamCounts
    shard_groups: ShardGroups  # what FSDP2 gathers
    grad_accum_steps: int | None  # None: found at start-up or varies with a token budget
    cluster: Cluster
    estimates: list[Estimate]
    recommended: Estimate | None

    @property
    def state_budget_bytes(self) -> int:
        return int(MAX_STATE_SHARE * self.cluster.gpu_memory_gib * GIB)


# --- the model, on the meta device -----------------------------------------------------------


def load_plan_model_config(name: str) -> tuple[Any, str]:
    """(config, where it came from): a local folder, the built-in table, or the HF cache; never downloads."""
    if Path(name).is_dir():
        return load_model_config(name), "local folder"
    from transformers import AutoConfig

    if name in BUILTIN_CONFIGS:
        return AutoConfig.for_model(**BUILTIN_CONFIGS[name]), "built-in config"

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "HF cache"
    except Exception:
        builtin = ", ".join(BUILTIN_CONFIGS)
        raise UserError(
            f"model.name_or_path: '{name}' is not a local folder, not in the HF cache and not a "
            f"built-in config ({builtin}); the planner never downloads: give a local folder holding "
            "the model's config.json (weights are not needed)."
        ) from None


def _untie_head_like_checkpoint(model: Any, model_config: Any) -> None:
    """Give the LM head its own weight where the checkpoint has one.

    transformers 5 always declares T5's head tied to `shared` (config.tie_word_embeddings is
    forced True) and records a config.json `tie_word_embeddings: false` as
    `scale_decoder_outputs=False`; from_pretrained then unties the head because FLAN-T5's two
    tensors differ. A model built from the config alone stays tied and would count
    247,577,856 - 32,128 x 768 = 222,903,552 parameters for flan-t5-base.
    """
    import torch

    untied = (
        model_config.model_type in T5_FAMILY
        and getattr(model_config, "scale_decoder_outputs", True) is False
    )
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if untied and head is not None and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight, device="meta"))


def build_meta_model(model_config: Any, peft_cfg: PeftConfig) -> Any:
    """The model (with LoRA adapters if asked) as the recipe builds it, without memory or weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto_class = (
        AutoModelForSeq2SeqLM if model_kind(model_config) == "seq2seq" else AutoModelForCausalLM
    )
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers/peft
        model = auto_class.from_config(model_config)
        _untie_head_like_checkpoint(model, model_config)
        if peft_cfg.method == "lora":  # "none": the whole model is trained
            model = apply_lora(model, peft_cfg, model_config)
    return model


def count_model_params(model: Any) -> ParamCounts:
    """Totals as DeepSpeed's zero3 `model_to_params` computes them, but meta-safe.

    DeepSpeed dedups shared parameters by `data_ptr()`, which is 0 for every meta tensor;
    `model.parameters()` dedups by identity, which is the same thing for a real model.
    The largest layer is the largest single module's own (recurse=False) parameters.
    """
    trainable, total = count_parameters(model)
    largest, largest_name = 0, ""
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own > largest:
            largest, largest_name = own, name
    return ParamCounts(total, trainable, largest, largest_name)


def planned_precision(requested: str, model_config: Any) -> str:
    """The precision the run gets on the GPU; `auto` means bf16 (Ampere or newer assumed)."""
    if requested == "auto":
        return "bf16"
    if requested in ("bf16", "fp32") or (
        requested == "fp16" and model_config.model_type not in T5_FAMILY
    ):
        return requested
    return resolve_dtype(requested, model_config)  # raises: an unknown name, or fp16 with T5


# --- memory per strategy ---------------------------------------------------------------------


def _deepspeed_bytes(
    strategy: Strategy, counts: ParamCounts, cluster: Cluster, zero_init: bool
) -> tuple[int, int]:
    """DeepSpeed's estimators: mixed precision (16-bit weights), every parameter trainable.

    Taken as they are, including one quirk: zero2 with offload counts CPU memory per node as
    params x max(4 x all GPUs, 16), so it grows with the number of nodes.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if strategy.zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(
            counts.total,
            cluster.gpus_per_node,
            cluster.nodes,
            cpu_offload=strategy.offload_optimizer,
            additional_buffer_factor=ADDITIONAL_BUFFER_FACTOR,
        )
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        counts.total,
        counts.largest_layer,
        cluster.gpus_per_node,
        cluster.nodes,
        cpu_offload=strategy.offload_optimizer,
        cpu_offload_params=strategy.offload_params,
        zero_init=zero_init,
        additional_buffer_factor=ADDITIONAL_BUFFER_FACTOR,
    )
    return cpu, gpu


def _formula_bytes(
    strategy: Strategy, counts: ParamCounts, cluster: Cluster, weight_bytes: int, zero_init: bool
) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per rank) where DeepSpeed has no estimator (DDP, ZeRO-1)
    or its estimator does not apply (LoRA: frozen weights; fp32: 4-byte weights).

    P params, T trainable, N ranks, g per node, n nodes, w bytes per DeepSpeed weight (2 in
    bf16/fp16, 4 in fp32). Every trainable parameter needs 16 bytes of fp32 optimizer state:
    master weight 4 + Adam momentum 4 + variance 4 + the fp32 gradient partition 4 (DeepSpeed's
    zero2 estimator: "18 = 2 grads_16bit + 4 grads_32bit + 4 params_32bit + 8 optimizer").
    With T = P and w = 2 these give DeepSpeed's numbers (tests check it on one node).
    """
    P, T, L = counts.total, counts.trainable, counts.largest_layer
    N, g, n, w = cluster.world_size, cluster.gpus_per_node, cluster.nodes, weight_bytes
    load = 4 * P * g  # each rank of a node loads the fp32 checkpoint into CPU memory first
    optimizer = 16 * T  # fp32 master + Adam m, v + fp32 gradient partition
    if strategy.zero_stage == 0:
        # accelerate's DDP keeps fp32 weights and autocasts to bf16, so precision does not
        # change states: weights 4 + grads 4 + Adam m, v 8 = 16 B per trainable param, + 4 for
        # DDP's gradient buckets (gradient_as_bucket_view=False): full fine-tune 20 B/param,
        # flan-t5-base 247.6M x 20 = 4.6 GiB. Frozen (LoRA base) weights: 4 B. One process: no DDP.
        buckets = 4 * T if N > 1 else 0
        return int(load * ADDITIONAL_BUFFER_FACTOR), 4 * P + 12 * T + buckets
    if strategy.zero_stage == 1:
        # w-byte weights and gradients on every rank, optimizer states sharded: (2w + 16/N) B/param
        # for a full fine-tune; bf16 on 8 GPUs: 4 + 2 = 6 B/param. 16/N and not the ZeRO paper's
        # 12/N: DeepSpeed also makes an fp32 copy of the gradient partition (counted by its zero2
        # estimator too); with 12, ZeRO-1 would need less than ZeRO-2 on one GPU.
        return int(load * ADDITIONAL_BUFFER_FACTOR), w * P + w * T + int(optimizer / N)
    if strategy.zero_stage == 2 and not strategy.offload_optimizer:
        return int(load * ADDITIONAL_BUFFER_FACTOR), w * P + int((w + 16) * T / N)
    if strategy.zero_stage == 2:
        return int(max(load, optimizer / n) * ADDITIONAL_BUFFER_FACTOR), w * P
    live_layer = 2 * w * L  # ZeRO-3 gathers one layer's weights and gradients at a time
    if not strategy.offload_optimizer:
        cpu = 4 * L * g if zero_init else load
        return int(cpu * ADDITIONAL_BUFFER_FACTOR), live_layer + int((w * P + optimizer) / N)
    offloaded = optimizer + (w * P if strategy.offload_params else 0)
    cpu = offloaded / n if zero_init else max(load, offloaded / n)
    gpu = live_layer + (0 if strategy.offload_params else int(w * P / N))
    return int(cpu * ADDITIONAL_BUFFER_FACTOR), gpu


def _fsdp2_estimate(
    strategy: Strategy,
    counts: ParamCounts,
    cluster: Cluster,
    precision: str,
    groups: ShardGroups,
    accumulates: bool,
) -> Estimate:
    found = fsdp2_bytes(
        counts.total,
        counts.trainable,
        groups,
        world_size=cluster.world_size,
        gpus_per_node=cluster.gpus_per_node,
        weight_bytes=4 if precision == "fp32" else 2,
        offload=strategy.offload_params,
        accumulates=accumulates,
    )
    cpu = int(found.cpu_per_node * ADDITIONAL_BUFFER_FACTOR)
    fits = (
        found.gpu <= MAX_STATE_SHARE * cluster.gpu_memory_gib * GIB
        and found.startup_gpu <= cluster.gpu_memory_gib * GIB
    )
    if cluster.cpu_memory_gib is not None:
        fits = fits and cpu <= cluster.cpu_memory_gib * GIB
    return Estimate(strategy, found.gpu, cpu, "formula", fits, found.startup_gpu)


def estimate_strategy(
    strategy: Strategy,
    counts: ParamCounts,
    cluster: Cluster,
    precision: str,
    zero_init: bool,
    *,
    groups: ShardGroups | None = None,
    accumulates: bool = True,
) -> Estimate:
    """One row. FSDP2 rows need the shard groups; `accumulates`: a step may take more than one
    micro-batch (FSDP2 then keeps unsharded gradients between them)."""
    if strategy.fsdp2:
        if groups is None:
            raise ValueError(f"{strategy.key}: FSDP2 rows need the model's shard groups")
        return _fsdp2_estimate(strategy, counts, cluster, precision, groups, accumulates)
    full_mixed = counts.trainable == counts.total and precision in ("bf16", "fp16")
    if strategy.zero_stage >= 2 and full_mixed:
        cpu, gpu = _deepspeed_bytes(strategy, counts, cluster, zero_init)
        source = "deepspeed"
    else:
        weight_bytes = 4 if precision == "fp32" else 2
        cpu, gpu = _formula_bytes(strategy, counts, cluster, weight_bytes, zero_init)
        source = "formula"
    fits = gpu <= MAX_STATE_SHARE * cluster.gpu_memory_gib * GIB
    if cluster.cpu_memory_gib is not None:
        fits = fits and cpu <= cluster.cpu_memory_gib * GIB
    return Estimate(strategy, int(gpu), int(cpu), source, fits)


def make_plan(cfg: FinetuneConfig, cluster: Cluster) -> MemoryPlan:
    if cluster.gpus_per_node < 1 or cluster.nodes < 1 or cluster.gpu_memory_gib <= 0:
        raise UserError(
            "--gpus-per-node and --nodes must be at least 1 and --gpu-memory-gib above 0."
        )
    model_config, source = load_plan_model_config(cfg.model.name_or_path)
    precision = planned_precision(cfg.model.dtype, model_config)
    model = build_meta_model(model_config, cfg.peft)
    counts = count_model_params(model)
    groups = count_shard_groups(model, model_config)
    accum = planned_grad_accum_steps(cfg, cluster.world_size)
    # T5 is loaded whole on every rank even under ZeRO-3 (modeling.supports_zero3_init).
    zero_init = supports_zero3_init(model_config)
    strategies = ((SINGLE_GPU,) + STRATEGIES[1:]) if cluster.world_size == 1 else STRATEGIES
    estimates = [
        estimate_strategy(
            s, counts, cluster, precision, zero_init, groups=groups, accumulates=accum != 1
        )
        for s in strategies
    ]
    recommended = next((e for e in estimates if e.fits and e.strategy.launch_file), None)
    return MemoryPlan(
        cfg.model.name_or_path,
        source,
        cfg.peft.method,
        precision,
        counts,
        groups,
        accum,
        cluster,
        estimates,
        recommended,
    )


def planned_grad_accum_steps(cfg: FinetuneConfig, world_size: int) -> int | None:
    """Micro-batches per optimizer step where the config fixes them; None where they are
    found at start-up (micro_batch_size auto) or vary with the data (micro_batch_tokens), and
    where the batch arithmetic is wrong (the run would stop; plan_cli's batch line says why)."""
    train = cfg.train
    if train.micro_batch_tokens:
        return None
    try:
        return check_batch_arithmetic(train.global_batch_size, train.micro_batch_size, world_size)
    except UserError:
        return None


# --- output ----------------------------------------------------------------------------------
