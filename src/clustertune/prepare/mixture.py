"""A weighted mixture of training sources, drawn once from the seed.

Each source's share is its weight over the sum of weights, of examples or of tokens
(data.mixture_weights). The mixed set holds data.mixture_examples examples (0: as many as the
sources hold together). A source's examples are taken from a stream of its rows: a seeded
permutation, then another, and so on, so a share larger than the source over-samples it
(every row once per pass) and a smaller one is a random subset. Examples: each source takes
its apportioned count (largest remainders, so the counts add up). Tokens: each source takes
rows until its share of the total tokens is reached, within one row's tokens. Every rank
draws the same from (seed, source index, pass): the same examples for any cluster shape.

    2 sources of 10,000 rows, weights 3 and 1, examples: 15,000 and 5,000 (1.5 and 0.5 passes)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceShare:
    name: str
    rows: int  # the source's rows
    examples: int  # drawn into the mixture
    tokens: int  # their tokens
    weight_share: float  # the share its weight asks for
    share: float  # the share it got, of examples or tokens

    @property
    def passes(self) -> float:
        return self.examples / self.rows

    def describe(self, by: str) -> str:
        return (
            f"{self.name}: {self.examples:,} examples ({self.passes:.2f} passes over "
            f"{self.rows:,}), {self.tokens:,} tokens: {100 * self.share:.2f}% of the {by} "
            f"(weight {100 * self.weight_share:.2f}%)"
        )


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def _stream(rows: int, seed: int, source: int, count: int) -> np.ndarray:
    """The first `count` rows of the source's stream (seeded passes of permutations)."""
    passes = [
        np.random.default_rng([seed, source, p]).permutation(rows)
        for p in range(-(-count // rows) if count else 0)
    ]
    return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)


def draw_mixture(
    names: list[str],
    lengths: list[np.ndarray],
    weights: list[float],
    *,
    by: str,
    total_examples: int,
    seed: int,
) -> tuple[list[np.ndarray], list[SourceShare]]:
    """Each source's drawn rows (indices into it) and what it got. `lengths`: each source's
    row lengths in tokens; `total_examples`: 0 for the sources' total."""
    sizes = np.array([len(x) for x in lengths])
    weight = np.asarray(weights, dtype=np.float64)
    total = total_examples or int(sizes.sum())
    drawn: list[np.ndarray] = []
    if by == "examples":
        for index, count in enumerate(_apportion(total, weight)):
            drawn.append(_stream(len(lengths[index]), seed, index, int(count)))
    else:
        all_tokens = sum(int(x.sum()) for x in lengths)
        target = all_tokens * total / int(sizes.sum())  # tokens the mixed set holds
        for index, source_lengths in enumerate(lengths):
            goal = target * weight[index] / weight.sum()
            mean = max(float(source_lengths.mean()), 1.0)
            stream = _stream(len(source_lengths), seed, index, int(goal / mean * 1.5) + 2)
            cumulative = np.cumsum(source_lengths[stream])
            while cumulative[-1] < goal:  # longer rows than the mean: more passes
                stream = _stream(len(source_lengths), seed, index, 2 * len(stream))
                cumulative = np.cumsum(source_lengths[stream])
            taken = int(np.searchsorted(cumulative, goal))  # cumulative[taken] >= goal
            under = cumulative[taken - 1] if taken else 0
            closer = taken + 1 if cumulative[taken] - goal < goal - under else taken
            drawn.append(stream[:closer])
    tokens = [int(lengths[i][d].sum()) for i, d in enumerate(drawn)]
    amounts = [len(d) for d in drawn] if by == "examples" else tokens
    shares = [
        SourceShare(
            names[i],
            int(sizes[i]),
            len(drawn[i]),
            tokens[i],
            float(weight[i] / weight.sum()),
            amounts[i] / max(sum(amounts), 1),
        )
        for i in range(len(names))
    ]
    return drawn, shares
