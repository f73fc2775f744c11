"""Deterministic, length-grouped global batches that do not depend on the cluster shape.

Every rank computes the same plan from (seed, epoch, lengths), so no indices are exchanged:
1. shuffle all example indices with the epoch's seed;
2. cut the shuffled list into groups of `length_group_size` global batches and sort each
   group by source length; then, in windows of TARGET_WINDOW global batches (sources already
   close), sort by target length before cutting global batches, so both sides pad little
   (DialogSum dev+test, global 32 / micro 8: padding efficiency 0.951 -> 0.966);
3. shuffle the order of the global batches (so training does not see lengths in order);
4. split each global batch, sorted by length, into world_size x grad_accum_steps
   contiguous micro-batches; micro-batch k goes to rank k % world_size at accumulation
   step k // world_size.
Steps 1-3 depend only on the seed and global_batch_size, so 1 rank x micro 8 and
2 ranks x micro 2 x accum 2 train on exactly the same examples in every optimizer step.

With a token budget (train.micro_batch_tokens) step 4 changes: the global batch, longest
first, is cut into micro-batches of whole examples costing at most the budget (padded:
rows x longest row, plus the decoder side for seq2seq; packed: the sum of lengths), their
count rounded up to a multiple of world_size (splitting the fullest, or adding a zero-weight
repeat when nothing can be split) so every rank runs the same number of micro-steps; the
costliest go first, round-robin to the ranks. E.g. budget 1,024, 32 examples of 100-300
tokens padded: ~11 micro-batches instead of 4 of 8 rows; 2 ranks: 12, 6 each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from clustertune.errors import UserError

T = TypeVar("T")

# Global batches per target-length window (step 2): wider mixes more source lengths into a
# global batch, narrower leaves targets unsorted; 4 measured best on DialogSum (3: 0.965, 6: 0.963).
TARGET_WINDOW = 4
# Bump when the plan changes the order of examples: a checkpoint then refuses to resume
# (the rest of its epoch would be different examples).
BATCH_PLAN_VERSION = 2


def derive_grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global_batch_size = micro_batch_size x grad_accum_steps x world_size, or a UserError."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size < 1:
        raise UserError("train.global_batch_size and train.micro_batch_size must be positive.")
    if global_batch_size % per_step:
        problem = (
            f"train.global_batch_size={global_batch_size} is not divisible by "
            f"micro_batch_size={micro_batch_size} x world_size={world_size} = {per_step}"
        )
        if global_batch_size % world_size:
            # Every rank takes the same number of examples per step, so no micro-batch size
            # can help: only a global batch size that is a multiple of the world size can.
            below = global_batch_size // world_size * world_size
            nearest = [size for size in (below, below + world_size) if size > 0]
            keeps_micro = max(per_step, round(global_batch_size / per_step) * per_step)
            also = (
                ""
                if keeps_micro in nearest
                else f" (or {keeps_micro} to keep micro_batch_size={micro_batch_size})"
            )
            raise UserError(
                f"{problem}, and no micro_batch_size works, since {global_batch_size} is not a "
                f"multiple of world_size={world_size}; set global_batch_size to a multiple of "
                f"{world_size}, e.g. {' or '.join(map(str, nearest))}{also}, or change the "
                "world size."
            )
        fits = [
            m for m in range(1, global_batch_size + 1) if global_batch_size % (m * world_size) == 0
        ]
        raise UserError(
            f"{problem}; use a micro_batch_size in {fits} or set "
            f"global_batch_size to a multiple of {per_step}."
        )
    return global_batch_size // per_step


def check_batch_arithmetic(
    global_batch_size: int, micro_batch_size: int | str, world_size: int, world: str = "world_size"
) -> int | None:
    """The one batch rule, for training, SLURM preflight and the planner: grad_accum_steps for
    a fixed micro_batch_size, None for `auto` (chosen at start-up; the global batch must
    still split evenly over the ranks). `world` names the world size in the message."""
    if micro_batch_size != "auto":
        return derive_grad_accum_steps(global_batch_size, int(micro_batch_size), world_size)
    if global_batch_size % world_size:
        raise UserError(
            f"train.global_batch_size={global_batch_size} is not divisible by "
            f"{world}={world_size}; use a multiple of {world_size}."
        )
    return None


@dataclass(frozen=True)
class GlobalBatchPlan:
    source_lengths: np.ndarray  # primary sort key
    target_lengths: np.ndarray  # tie-break, and the loss denominator
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    length_group_size: int = 50
    micro_batch_tokens: int = 0  # 0: micro_batch_size examples per micro-batch
    row_lengths: np.ndarray | None = None  # tokens of each input row (token budget)
    label_lengths: np.ndarray | None = None  # seq2seq: decoder tokens of each example
    packing: bool = False  # a micro-batch costs the sum of its lengths, not rows x longest

    def __post_init__(self) -> None:
        if len(self.source_lengths) < self.global_batch_size:
            raise UserError(
                f"the training data has {len(self.source_lengths)} examples, fewer than "
                f"train.global_batch_size={self.global_batch_size}; lower the global batch size."
            )
        if self.micro_batch_tokens:
            longest = int(self.costs.max())
            if longest > self.micro_batch_tokens:
                raise UserError(
                    f"train.micro_batch_tokens={self.micro_batch_tokens} is smaller than the "
                    f"longest example ({longest} tokens on its own); raise it to at least "
                    f"{longest}, or lower data.max_length / data.max_source_length."
                )

    @property
    def costs(self) -> np.ndarray:
        """Tokens one example costs in a micro-batch of its own."""
        assert self.row_lengths is not None, "a token budget needs row_lengths"
        labels = self.label_lengths if self.label_lengths is not None else 0
        return self.row_lengths + labels

    @property
    def grad_accum_steps(self) -> int:
        return derive_grad_accum_steps(
            self.global_batch_size, self.micro_batch_size, self.world_size
        )

    @property
    def steps_per_epoch(self) -> int:
        # The remainder (N mod global_batch_size) is dropped each epoch; a different
        # remainder each epoch, since the shuffle changes.
        return len(self.source_lengths) // self.global_batch_size

    def _sort_by_length(self, indices: np.ndarray) -> np.ndarray:
        # Longest first; lexsort's last key is primary. Ties broken by index: deterministic.
        order = np.lexsort((indices, -self.target_lengths[indices], -self.source_lengths[indices]))
        return indices[order]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        shuffled = rng.permutation(len(self.source_lengths))
        used = shuffled[: self.steps_per_epoch * self.global_batch_size]
        group = self.length_group_size * self.global_batch_size
        batches = []
        window = TARGET_WINDOW * self.global_batch_size
        for start in range(0, len(used), group):
            grouped = self._sort_by_length(used[start : start + group])
            for w in range(0, len(grouped), window):
                part = grouped[w : w + window]
                part = part[
                    np.lexsort((part, -self.source_lengths[part], -self.target_lengths[part]))
                ]
                batches += [
                    part[i : i + self.global_batch_size]
                    for i in range(0, len(part), self.global_batch_size)
                ]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def micro_batches(self, global_batch: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of one global batch, in accumulation order."""
        ordered = self._sort_by_length(global_batch)
        size = self.micro_batch_size
        return [
            ordered[
                (a * self.world_size + self.rank) * size : (a * self.world_size + self.rank + 1)
                * size
            ]
            for a in range(self.grad_accum_steps)
        ]

    def rank_micro_batches(self, global_batch: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """This rank's micro-batches of one global batch, in accumulation order, as
        (indices, is_padding); a padding micro-batch runs with zero weight (equal calls)."""
        if not self.micro_batch_tokens:
            return [(indices, False) for indices in self.micro_batches(global_batch)]
        bins = self.token_bins(global_batch)
        return bins[self.rank :: self.world_size]

    def token_bins(self, global_batch: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """Every rank's micro-batches of one global batch under the token budget, a multiple
        of world_size of them, costliest first (rank r takes r, r + world_size, ...)."""
        costs, labels = self.costs, self.label_lengths
        order = global_batch[np.lexsort((global_batch, -costs[global_batch]))]
        bins = fill_token_bins(
            order, self.row_lengths, labels, self.micro_batch_tokens, self.packing
        )
        target = -(-len(bins) // self.world_size) * self.world_size
        while len(bins) < target and max(len(b) for b in bins) > 1:
            fullest = max(range(len(bins)), key=lambda i: (len(bins[i]), -i))
            half = (len(bins[fullest]) + 1) // 2
            bins[fullest : fullest + 1] = [bins[fullest][:half], bins[fullest][half:]]
        cost = [bin_cost(b, self.row_lengths, labels, self.packing) for b in bins]
        ranked = sorted(range(len(bins)), key=lambda i: (-cost[i], int(bins[i][0])))
        out = [(bins[i], False) for i in ranked]
        out += [(order[-1:], True)] * (target - len(out))  # nothing left to split
        return out

    def micro_steps(self, global_batch: np.ndarray) -> int:
        """Micro-batches per rank in this optimizer step (the same on every rank)."""
        if not self.micro_batch_tokens:
            return self.grad_accum_steps
        return len(self.token_bins(global_batch)) // self.world_size

    def most_micro_steps(self, total_steps: int) -> int:
        """The most micro-steps per rank over the run's first total_steps steps."""
        most, epoch = 1, 0
        while epoch * self.steps_per_epoch < total_steps:
            batches = self.global_batches(epoch)[: total_steps - epoch * self.steps_per_epoch]
            most = max([most, *(self.micro_steps(batch) for batch in batches)])
            epoch += 1
        return most

    def target_tokens(self, global_batch: np.ndarray) -> int:
        """Loss denominator: target tokens of the whole global batch, known on every rank."""
        return int(self.target_lengths[global_batch].sum())


def bin_cost(
    indices: np.ndarray, row_lengths: np.ndarray, label_lengths: np.ndarray | None, packing: bool
) -> int:
    """Token slots of one micro-batch: packed, the sum of its rows; padded, rows x longest
    (+ rows x longest decoder side for seq2seq)."""
    if packing:
        return int(row_lengths[indices].sum())
    cost = len(indices) * int(row_lengths[indices].max())
    if label_lengths is not None:
        cost += len(indices) * int(label_lengths[indices].max())
    return cost


def fill_token_bins(
    order: np.ndarray,
    row_lengths: np.ndarray,
    label_lengths: np.ndarray | None,
    budget: int,
    packing: bool,
) -> list[np.ndarray]:
    """Examples (longest first) into micro-batches costing at most `budget` tokens. Padded:
    consecutive runs (sorted, so rows in a micro-batch are of similar length). Packed: first
    fit decreasing, each example into the first micro-batch with room (bins end up full)."""
    if not packing:
        bins: list[list[int]] = []
        for index in order:
            if (
                bins
                and bin_cost(np.array([*bins[-1], index]), row_lengths, label_lengths, False)
                <= budget
            ):
                bins[-1].append(int(index))
            else:
                bins.append([int(index)])
        return [np.array(b, dtype=order.dtype) for b in bins]
    packed: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = int(row_lengths[index])
        slot = next((i for i, free in enumerate(room) if free >= length), None)
        if slot is None:
            packed.append([int(index)])
            room.append(budget - length)
        else:
            packed[slot].append(int(index))
            room[slot] -= length
    return [np.array(b, dtype=order.dtype) for b in packed]


def deal_to_ranks(
    batches: Sequence[T], world_size: int, rank: int, equal_calls: bool = True
) -> list[tuple[T, bool]]:
    """This rank's batches, round-robin, as (batch, is_padding) pairs: the one rule for "every
    rank runs the same number of forward passes", used by the eval loss and by generation.

    equal_calls (ZeRO-3 gathers parameters collectively in each forward): every rank gets
    ceil(len(batches) / world_size) calls; a rank short of work repeats the last batch
    (the shortest, when sorted longest first) with is_padding=True, and its outputs must be
    dropped. E.g. 5 batches on 2 ranks: rank 0 runs 0, 2, 4; rank 1 runs 1, 3 and 4 again.
    """
    mine = [(batch, False) for batch in batches[rank::world_size]]
    if equal_calls and len(batches):
        calls = -(-len(batches) // world_size)
        mine += [(batches[-1], True)] * (calls - len(mine))
    return mine


def eval_micro_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    world_size: int,
    rank: int,
    *,
    budget: int = 0,
    row_lengths: np.ndarray | None = None,
    label_lengths: np.ndarray | None = None,
    packing: bool = False,
) -> list[tuple[np.ndarray, bool]]:
    """Length-sorted eval micro-batches for this rank, as (indices, is_padding) pairs, with
    the same number of micro-batches on every rank (`deal_to_ranks`): micro_batch_size
    examples each, or with a token `budget` as many as fit (fill_token_bins)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if budget:
        assert row_lengths is not None
        chunks = fill_token_bins(order, row_lengths, label_lengths, budget, packing)
    else:
        chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return deal_to_ranks(chunks, world_size, rank, equal_calls=True)
