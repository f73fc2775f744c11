"""The global-batch plan: deterministic, shape-independent, disjoint and covering, grouped."""

from __future__ import annotations

import numpy as np
import pytest

from clustertune.errors import UserError
from clustertune.sampler import GlobalBatchPlan, derive_grad_accum_steps, eval_micro_batches

RNG = np.random.default_rng(0)
SOURCE = RNG.integers(20, 400, size=203)
TARGET = RNG.integers(5, 60, size=203)


def plan(world_size=1, rank=0, micro=8, global_batch=16, seed=3, group=4):
    return GlobalBatchPlan(SOURCE, TARGET, global_batch, micro, world_size, rank, seed, group)


def test_deterministic_and_epoch_dependent():
    a, b = plan().global_batches(0), plan().global_batches(0)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, plan().global_batches(1), strict=True))


def test_same_global_batches_whatever_the_cluster_shape():
    reference = plan(world_size=1, micro=16).global_batches(0)
    for world_size, micro in [(2, 2), (4, 4), (2, 8), (8, 1)]:
        for rank in range(world_size):
            batches = plan(world_size=world_size, rank=rank, micro=micro).global_batches(0)
            assert all((x == y).all() for x, y in zip(reference, batches, strict=True))


@pytest.mark.parametrize(("world_size", "micro"), [(1, 16), (2, 4), (4, 2), (2, 8)])
def test_ranks_are_disjoint_and_cover_each_global_batch(world_size, micro):
    plans = [plan(world_size=world_size, rank=r, micro=micro) for r in range(world_size)]
    for global_batch in plans[0].global_batches(0):
        taken = np.concatenate([mb for p in plans for mb in p.micro_batches(global_batch)])
        assert sorted(taken.tolist()) == sorted(global_batch.tolist())
        assert all(len(mb) == micro for p in plans for mb in p.micro_batches(global_batch))


def test_epoch_uses_distinct_examples_and_drops_only_the_remainder():
    batches = plan().global_batches(0)
    flat = np.concatenate(batches)
    assert len(flat) == len(set(flat.tolist())) == (203 // 16) * 16


def padding_efficiency(batches, micro):
    real = padded = 0
    for global_batch in batches:
        for start in range(0, len(global_batch), micro):
            chunk = SOURCE[global_batch[start : start + micro]]
            real, padded = real + chunk.sum(), padded + chunk.max() * len(chunk)
    return real / padded


def test_length_grouping_cuts_padding():
    grouped = plan(world_size=1, micro=4, group=12)
    random_order = [
        np.random.default_rng(1).permutation(203)[i : i + 16] for i in range(0, 192, 16)
    ]
    ordered = [grouped._sort_by_length(b) for b in grouped.global_batches(0)]
    assert padding_efficiency(ordered, 4) > padding_efficiency(random_order, 4) + 0.2


def test_grad_accum_derivation_and_its_error():
    assert derive_grad_accum_steps(64, 4, 8) == 2
    with pytest.raises(
        UserError,
        match=r"global_batch_size=30 is not divisible by micro_batch_size=4 x world_size=2",
    ):
        derive_grad_accum_steps(30, 4, 2)


def test_too_little_data_is_a_user_error():
    with pytest.raises(UserError, match="fewer than"):
        GlobalBatchPlan(SOURCE[:5], TARGET[:5], 16, 8, 1, 0, 0)


def test_eval_batches_equal_count_per_rank_and_cover_once():
    lengths = RNG.integers(1, 100, size=23)
    per_rank = [eval_micro_batches(lengths, 4, 3, r) for r in range(3)]
    assert len({len(x) for x in per_rank}) == 1  # same number of forwards (ZeRO-3)
    counted = np.concatenate(
        [idx for mine in per_rank for idx, is_padding in mine if not is_padding]
    )
    assert sorted(counted.tolist()) == list(range(23))
