"""FSDP2's model-state memory per GPU for the planner (clustertune.plan): the arithmetic of what
clustertune.fsdp.shard_model builds, from the same parameter counts as the DDP and ZeRO rows.

shard_model calls `fully_shard` on each transformer block, then on the root, which keeps what
no block holds (embeddings, LM head, final norms). Per rank, with P parameters, T trainable,
N ranks and w bytes per compute weight (2 in bf16/fp16, 4 in fp32):

- sharded, always resident: the model is loaded in fp32 and FSDP2 keeps the fp32 parameters
  themselves as the shards (MixedPrecisionPolicy casts them to bf16 only when it all-gathers,
  so there is no separate 16-bit copy as under ZeRO), their fp32 gradients (reduce_dtype fp32)
  and Adam's two fp32 moments: (4 P + 12 T) / N. ZeRO-3 shards the same three plus a 16-bit
  copy of every weight: (2 P + 16 T) / N, 18 B/param against FSDP2's 16 in a full fine-tune.
  LoRA: the frozen base is sharded too, at 4 B/param (fp32, as loaded), where ZeRO-3 holds 2.
- gathered, one group at a time: a block's w-byte weights while it runs forward or backward,
  and the w-byte gradients of its trainable ones until they are reduce-scattered. The root
  group's forward is the whole model's, so its weights stay gathered from the start of forward
  to the end of backward (re-gathered for backward), and its gradients (LM head first) for
  the whole backward: w (R + B) + w (Rt + Bt) for the root R and the largest block B (Rt, Bt
  their trainable parameters). Like DeepSpeed's ZeRO-3 estimator, which counts one gathered
  layer, this leaves the next block's prefetched all-gather and the fp32 reduce-scatter buffer
  of one block to the headroom.
- accumulation: on the micro-batches that skip the reduce-scatter
  (set_requires_gradient_sync(False)), FSDP2 keeps every group's gradient unsharded, in fp32
  (reduce_dtype), until the last one: 4 T more per rank whenever a step takes more than one
  micro-batch. ZeRO-2/3 reduce each micro-batch's gradients into their shards instead.
- offload (CPUOffloadPolicy): the sharded states live in CPU memory; the GPU holds the
  gathered groups (and the accumulated gradients, which stay where backward made them).

E.g. flan-t5-base, full fine-tune, bf16, 8 ranks, one micro-batch per step: P = T = 247.6 M,
R = 49.35 M (shared + lm_head + 2 final norms), B = 9.44 M (a decoder T5Block):
16 x 247.6 M / 8 = 495.2 MB sharded + 2 x 2 x (49.35 M + 9.44 M) = 235.2 MB gathered
= 730.3 MB = 0.68 GiB, against ZeRO-3's 0.61 GiB (DeepSpeed counts its largest layer, the
24.7 M embedding, where FSDP2 gathers the whole root group).

Start-up: every rank loads the fp32 checkpoint into CPU memory first (4 P per rank, as under
DDP); fully_shard then moves one group at a time to the GPU and keeps its shard, so a GPU
holds at most the fp32 shards made so far and one whole group: 4 P / N + 4 max(R, B)
(without offload; with LoRA in bf16 this can exceed the step's figure, whose groups are
gathered in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune.fsdp import block_classes

# Bytes per parameter that FSDP2 keeps sharded: the fp32 parameter (every parameter) and, for
# a trainable one, its fp32 gradient and Adam's fp32 momentum and variance (4 + 4 + 8).
SHARDED_PARAM_BYTES = 4
SHARDED_TRAINABLE_BYTES = 12
# The fp32 gradient of every trainable parameter, unsharded, between micro-batches.
ACCUMULATED_GRAD_BYTES = 4


@dataclass(frozen=True)
class ShardGroups:
    """Parameters per `fully_shard` group as fsdp.shard_model forms them."""

    block_class: str  # the wrapped class(es), e.g. "T5Block"; "" when the model has none
    blocks: int
    largest_block: int  # parameters of the largest block
    largest_block_trainable: int  # the most trainable parameters any one block holds
    root: int  # parameters outside every block: embeddings, LM head, final norms
    root_trainable: int


@dataclass(frozen=True)
class FSDP2Bytes:
    gpu: int  # per rank, in training
    cpu_per_node: int  # before DeepSpeed's slack factor, which the planner applies to every row
    startup_gpu: int  # per rank while fully_shard shards the model, group by group


def count_shard_groups(model: Any, model_config: Any) -> ShardGroups:
    """Walk the (meta) model as shard_model does: every module whose class is one of the
    model's blocks (its _no_split_modules) is a group; what no block holds is the root's.
    Parameters are counted once each (tied weights are one parameter)."""
    names = set(block_classes(model_config))
    in_blocks: set[int] = set()
    sizes: list[tuple[int, int]] = []  # (parameters, trainable) per block
    for module in model.modules():
        if type(module).__name__ not in names:
            continue
        params = [p for p in module.parameters() if id(p) not in in_blocks]
        in_blocks.update(id(p) for p in params)
        sizes.append(
            (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
        )
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return ShardGroups(
        block_class=", ".join(sorted(names)) if sizes else "",
        blocks=len(sizes),
        largest_block=max((s[0] for s in sizes), default=0),
        largest_block_trainable=max((s[1] for s in sizes), default=0),
        root=sum(p.numel() for p in root),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
    )


def fsdp2_bytes(
    total: int,
    trainable: int,
    groups: ShardGroups,
    *,
    world_size: int,
    gpus_per_node: int,
    weight_bytes: int,
    offload: bool,
    accumulates: bool,
) -> FSDP2Bytes:
    """Model states per rank under launch/fsdp2.yaml (offload False) or fsdp2_offload.yaml
    (offload True); the module docstring gives each term."""
    sharded_per_rank = (SHARDED_PARAM_BYTES * total + SHARDED_TRAINABLE_BYTES * trainable) / (
        world_size
    )
    gathered = weight_bytes * (groups.root + groups.largest_block) + weight_bytes * (
        groups.root_trainable + groups.largest_block_trainable
    )
    accumulated = ACCUMULATED_GRAD_BYTES * trainable if accumulates else 0
    load = 4 * total * gpus_per_node  # each rank of a node loads the fp32 checkpoint
    if offload:  # a node holds its g ranks' shards: (4 P + 12 T) x g / N = (4 P + 12 T) / n
        offloaded = sharded_per_rank * gpus_per_node
        return FSDP2Bytes(
            gpu=gathered + accumulated, cpu_per_node=int(max(load, offloaded)), startup_gpu=0
        )
    return FSDP2Bytes(
        gpu=int(sharded_per_rank) + gathered + accumulated,
        cpu_per_node=load,
        startup_gpu=int(4 * total / world_size) + 4 * max(groups.root, groups.largest_block),
    )
