"""The planner's report and command line: the table, the recommended launch command, JSON.

    python recipes/plan.py --config recipes/configs/flan_t5_base/full.yaml \
        --gpus-per-node 8 --nodes 1 --gpu-memory-gib 80 [--section.key=value ...] [--json plan.json]

The estimates themselves are clustertune.plan.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clustertune.config import FinetuneConfig, parse_config
from clustertune.errors import UserError, exit_on_user_error
from clustertune.plan import GIB, MAX_STATE_SHARE, Cluster, Estimate, MemoryPlan, make_plan
from clustertune.sampler import check_batch_arithmetic


def launch_command(plan: MemoryPlan, config_args: Sequence[str]) -> str | None:
    if plan.recommended is None:
        return None
    cluster = plan.cluster
    parts = [
        "clustertune-launch",
        "--config_file",
        plan.recommended.strategy.launch_file,
        "--num_processes",
        str(cluster.world_size),
    ]
    command = shlex.join(parts)
    if (
        cluster.nodes > 1
    ):  # the same command on every node; under SLURM, clustertune.slurm.env fills these in
        command += (
            f" --num_machines {cluster.nodes} --machine_rank $NODE_RANK"
            " --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT"
        )
    return f"{command} recipes/finetune.py {shlex.join(config_args)}".rstrip()


def _batch_line(cfg: FinetuneConfig, world_size: int) -> str:
    micro = cfg.train.micro_batch_size
    if cfg.train.micro_batch_tokens:  # examples per micro-batch vary; the budget is the bound
        return (
            f"batch: global {cfg.train.global_batch_size} examples, micro-batches of at most "
            f"{cfg.train.micro_batch_tokens} tokens ({'packed' if cfg.data.packing else 'padded'})"
        )
    try:
        accum = check_batch_arithmetic(cfg.train.global_batch_size, micro, world_size)
    except UserError as error:
        return f"warning: the training run would stop: {error}"
    if accum is None:  # "auto": found on the GPU at start-up
        return f"batch: global {cfg.train.global_batch_size}, micro_batch_size {micro} (chosen at start-up)"
    return (
        f"batch: global {cfg.train.global_batch_size} = micro {micro} x accum {accum} "
        f"x {_count(world_size, 'GPU')}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_plan(plan: MemoryPlan, command: str | None, batch_line: str) -> str:
    counts, cluster = plan.counts, plan.cluster
    method = "LoRA" if plan.method == "lora" else "full fine-tune"
    budget = plan.state_budget_bytes / GIB
    precision = {"bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision", "fp32": "fp32"}[
        plan.precision
    ]
    lines = [
        f"model: {plan.model} ({plan.model_source}), {method}, {precision}",
        f"parameters: {counts.total:,} total, {counts.trainable:,} trainable; largest layer "
        f"{counts.largest_layer:,} ({counts.largest_layer_name or 'root'})",
        f"cluster: {_count(cluster.nodes, 'node')} x {_count(cluster.gpus_per_node, 'GPU')} x "
        f"{cluster.gpu_memory_gib:g} GiB = {_count(cluster.world_size, 'rank')}",
        f"rule: model states <= {MAX_STATE_SHARE:.0%} of GPU memory ({budget:.1f} GiB); the rest is for "
        "activations (not estimated), CUDA context, communication buffers, fragmentation",
    ]
    if plan.precision == "bf16":
        lines.append(
            "precision: model.dtype=auto/bf16 plans bf16 (Ampere or newer); "
            "--model.dtype=fp32 plans for GPUs without bf16"
        )
    if plan.method == "lora":
        lines.append(
            "LoRA: DeepSpeed's estimators assume every parameter trainable, so every row "
            "is plan.py's formula (frozen weights need no gradients or optimizer state)"
        )
    if any(e.strategy.fsdp2 for e in plan.estimates):
        lines.append(_fsdp2_line(plan))
    lines += [
        "",
        f"{'strategy':34} {'GPU GiB':>8} {'of GPU':>7} {'CPU GiB/node':>13}  {'fits':4}  "
        f"{'launch file':26} estimate",
    ]
    for e in plan.estimates:
        share = e.gpu_bytes / (cluster.gpu_memory_gib * GIB)
        mark = "<-" if e is plan.recommended else ""
        launch = e.strategy.launch_file or "(none ships)"
        source = "DeepSpeed" if e.source == "deepspeed" else "formula"
        lines.append(
            f"{e.strategy.label:34} {e.gpu_bytes / GIB:8.2f} {share:7.1%} "
            f"{e.cpu_bytes_per_node / GIB:13.2f}  {'yes' if e.fits else 'no':4}  "
            f"{launch:26} {source} {mark}".rstrip()
        )
    lines.append("")
    for e in plan.estimates:
        if e.startup_gpu_bytes > cluster.gpu_memory_gib * GIB:
            lines.append(
                f"{e.strategy.label} does not fit at start-up: the fp32 shards and the largest "
                f"group whole ({e.startup_gpu_bytes / GIB:.1f} GiB) are on each GPU as it shards."
            )
    if plan.recommended is None:
        lines.append(
            "recommended: nothing fits; add GPUs or nodes, use LoRA (--peft.method=lora), "
            "or a smaller model."
        )
        return "\n".join(lines)
    faster = [e for e in plan.estimates[: plan.estimates.index(plan.recommended)] if e.fits]
    lines.append(
        f"recommended: {plan.recommended.strategy.label}, the fastest strategy (rows run "
        "fastest to slowest) whose model states fit the rule:"
    )
    lines.append(f"  {command}")
    if faster:  # fit and are faster, but have no launch file
        labels = " and ".join(e.strategy.label for e in faster)
        lines.append(
            f"note: {labels} also fit(s) and is usually faster, but no launch file ships for it: "
            "copy a zero2/zero3 launch file and its DeepSpeed JSON and add offload_optimizer."
        )
    lines.append(batch_line)
    return "\n".join(lines)


def _fsdp2_line(plan: MemoryPlan) -> str:
    groups = plan.shard_groups
    if groups.blocks:
        gathered = (
            f"and one of {groups.blocks} {groups.block_class} groups at a time (the largest "
            f"{groups.largest_block:,})"
        )
    else:
        gathered = "(no transformer blocks: the whole model is one group)"
    if plan.grad_accum_steps == 1:
        accumulation = "one micro-batch per step: no unsharded gradients kept"
    else:
        steps = plan.grad_accum_steps or "maybe several"
        accumulation = (
            f"micro-batches per step: {steps}, so the FSDP2 rows include the unsharded fp32 "
            "gradients FSDP2 keeps between them (4 B per trainable parameter)"
        )
    return (
        f"FSDP2 gathers the root group ({groups.root:,} parameters outside the blocks) for the "
        f"whole step {gathered}; {accumulation}"
    )


def plan_to_dict(plan: MemoryPlan, command: str | None) -> dict[str, Any]:
    def row(e: Estimate) -> dict[str, Any]:
        return {
            **asdict(e.strategy),
            "gpu_bytes": e.gpu_bytes,
            "gpu_gib": e.gpu_bytes / GIB,
            "cpu_bytes_per_node": e.cpu_bytes_per_node,
            "source": e.source,
            "fits": e.fits,
            "startup_gpu_bytes": e.startup_gpu_bytes,
        }

    return {
        "model": plan.model,
        "model_source": plan.model_source,
        "method": plan.method,
        "precision": plan.precision,
        "params": asdict(plan.counts),
        "fsdp2_shard_groups": asdict(plan.shard_groups),
        "grad_accum_steps": plan.grad_accum_steps,
        "cluster": asdict(plan.cluster),
        "max_state_share": MAX_STATE_SHARE,
        "estimates": [row(e) for e in plan.estimates],
        "recommended": plan.recommended.strategy.key if plan.recommended else None,
        "command": command,
    }


def _planner_args() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plan.py",
        allow_abbrev=False,
        description="Model-state memory per GPU under DDP, ZeRO 1/2/3 and FSDP2 (+offload) and a "
        "launch command.",
        epilog="All other arguments are the fine-tuning config's: --config FILE and --section.key=value "
        "overrides (python recipes/finetune.py --help lists them).",
    )
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--gpu-memory-gib", type=float, required=True, help="memory of one GPU, e.g. 80"
    )
    parser.add_argument(
        "--cpu-memory-gib",
        type=float,
        default=None,
        help="CPU memory per node; rows that need more do not fit (default: not checked)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    planner, config_args = _planner_args().parse_known_args(argv)
    cfg = parse_config(FinetuneConfig, config_args)
    cluster = Cluster(
        planner.gpus_per_node, planner.nodes, planner.gpu_memory_gib, planner.cpu_memory_gib
    )
    plan = make_plan(cfg, cluster)
    command = launch_command(plan, config_args)
    print(format_plan(plan, command, _batch_line(cfg, cluster.world_size)), flush=True)
    if planner.json is not None:
        planner.json.parent.mkdir(parents=True, exist_ok=True)
        planner.json.write_text(json.dumps(plan_to_dict(plan, command), indent=2) + "\n")
    return 0
