"""Exact, offline ROUGE for dialogue summarisation, with multi-reference protocols and CIs.

Why not `evaluate.load("rouge")`: it downloads its script from the Hub (fails on offline
compute nodes), and it reports `BootstrapAggregator().mid`, which is the *median of unseeded
bootstrap means*, not the mean, so the number moves from run to run. Here the headline
number is the plain mean over examples and the bootstrap only gives a seeded CI.

Scores come from `rouge_score.RougeScorer(..., use_stemmer=True)`, which is what
`evaluate` wraps (the transformers summarisation examples pass `use_stemmer=True`;
`evaluate`'s own default is False). F-measure x 100.

Three protocols, because DialogSum's test split has 3 references per dialogue while the
Hub copy flattens it to 1500 single-reference rows, and the numbers differ:
  best  -- max F over references (what `RougeScorer.score_multi` and the multi-reference
           ROUGE literature report: a summary is as good as the closest human summary);
  mean  -- mean F over references (rewards matching all annotators, lower than best);
  first -- F against references[0] only (what a single-reference evaluation gives).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

METRICS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PROTOCOLS: tuple[str, ...] = ("best", "mean", "first")

# Names used in the report, so a reader of the JSON does not have to guess what "best" means.
REPORT_PROTOCOL_NAMES: dict[str, str] = {
    "best": "best_reference",
    "mean": "mean_over_references",
    "first": "first_reference",
}
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "best_reference": "Per example and per metric, the highest F-measure over its references "
    "(same choice as rouge_score's RougeScorer.score_multi).",
    "mean_over_references": "Per example, the mean F-measure over its references.",
    "first_reference": "Per example, the F-measure against its first reference only "
    "(what a single-reference copy of the data set gives).",
}

# Lower-cased tokens that end in a period but do not end a sentence.
_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "mr.", "mrs.", "ms.", "dr.", "st.", "prof.", "jr.", "sr.",
        "e.g.", "i.e.", "etc.", "a.m.", "p.m.", "u.s.", "vs.",
    }
)  # fmt: skip

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace,
# then something that can start a sentence (capital, digit, quote, bracket, or '#' as in
# DialogSum's '#Person1#'). Requiring whitespace after the '.' is what keeps "3.50" whole.
_BOUNDARY_RE = re.compile(
    r"[.!?][\"'\u201d\u2019)\]]*(?P<space>\s+)(?=[A-Z0-9\"'\u201c\u2018(\[#])"
)

# One scorer per process: it holds a Porter stemmer and is stateless across calls.
_SCORER = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)


def split_sentences(text: str) -> str:
    """Put each sentence of `text` on its own line, as rougeLsum expects.

    A regex splitter instead of nltk punkt, which needs a download (punkt_tab for
    NLTK >= 3.9) that offline nodes cannot make. Existing line breaks are kept as boundaries.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY_RE.finditer(line):
            punctuation_end = match.start("space")
            # The whitespace-delimited word that carries the period, e.g. "Mr." or "(e.g.".
            word = line[start:punctuation_end].rsplit(None, 1)[-1].lstrip("\"'(\u201c\u2018[")
            if word.lower() in _ABBREVIATIONS:
                continue
            sentences.append(line[start:punctuation_end].strip())
            start = match.end("space")
        sentences.append(line[start:].strip())
    return "\n".join(sentence for sentence in sentences if sentence)


def score_example(prediction: str, references: list[str]) -> dict[str, Any]:
    """Score one prediction against its references under the three protocols.

    Returns {"per_reference": [{metric: F}, ...], "best": {metric: F}, "mean": {...},
    "first": {...}, "best_reference_index": {metric: i}}, F in [0, 100].
    """
    if isinstance(references, str):
        raise ValueError(
            "references must be a list of strings, got a single string; wrap it as [reference]."
        )
    if len(references) == 0:
        raise ValueError("references is empty; every prediction needs at least one reference.")

    # Split once for all four metrics: the tokenizer maps every non-alphanumeric character,
    # '\n' included, to a separator, so rouge1/rouge2/rougeL are unchanged by the newlines
    # and only rougeLsum (which reads '\n' as a sentence boundary) sees them.
    split_prediction = split_sentences(prediction)
    per_reference = []
    for reference in references:
        scores = _SCORER.score(split_sentences(reference), split_prediction)
        per_reference.append({metric: 100.0 * scores[metric].fmeasure for metric in METRICS})

    best: dict[str, float] = {}
    best_index: dict[str, int] = {}
    for metric in METRICS:
        values = [scores[metric] for scores in per_reference]
        # np.argmax, as in score_multi: the first reference wins a tie, and each metric
        # picks its own reference (rouge1's best may be a different reference than rouge2's).
        best_index[metric] = int(np.argmax(values))
        best[metric] = values[best_index[metric]]
    return {
        "per_reference": per_reference,
        "best": best,
        "mean": {m: float(np.mean([s[m] for s in per_reference])) for m in METRICS},
        "first": dict(per_reference[0]),
        "best_reference_index": best_index,
    }


def aggregate(
    per_example: list[dict[str, Any]],
    *,
    confidence: float = 0.95,
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over examples and a seeded percentile-bootstrap CI, per protocol and metric.

    Every (protocol, metric) column is resampled with the same example indices, so the CIs
    describe one set of bootstrap replicates of the test set.
    """
    if len(per_example) == 0:
        raise ValueError("per_example is empty; score at least one example before aggregating.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95.")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}; e.g. 1000.")

    num_examples = len(per_example)
    rng = np.random.default_rng(seed)
    # (num_bootstrap, num_examples) int64: 1000 x 1500 DialogSum rows = 12 MB.
    resample_indices = rng.integers(0, num_examples, size=(num_bootstrap, num_examples))
    tail = 100.0 * (1.0 - confidence) / 2.0  # 2.5 for a 95% interval

    means: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    for protocol in PROTOCOLS:
        means[protocol], intervals[protocol] = {}, {}
        for metric in METRICS:
            values = np.array([example[protocol][metric] for example in per_example])
            replicate_means = values[resample_indices].mean(axis=1)
            low, high = np.percentile(replicate_means, [tail, 100.0 - tail])
            means[protocol][metric] = float(values.mean())
            intervals[protocol][metric] = (float(low), float(high))
    return {
        "num_examples": num_examples,
        "means": means,
        "confidence_intervals": intervals,
        "bootstrap": {
            "method": "percentile",
            "confidence": confidence,
            "num_bootstrap": num_bootstrap,
            "seed": seed,
        },
    }


def rouge_report(
    predictions: list[str], references: list[list[str]], **aggregate_kwargs: Any
) -> dict[str, Any]:
    """Score a whole evaluation set; JSON-ready, values rounded to 4 decimals.

    Top-level rouge1/rouge2/rougeL/rougeLsum are the best-reference means, the usual
    multi-reference number. `aggregate_kwargs` go to `aggregate` (confidence, num_bootstrap,
    seed).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass exactly one list of references per prediction."
        )
    per_example = [
        score_example(prediction, example_references)
        for prediction, example_references in zip(predictions, references, strict=True)
    ]
    summary = aggregate(per_example, **aggregate_kwargs)
    references_per_example = [len(example_references) for example_references in references]

    def rounded(value: float) -> float:
        return round(value, 4)

    report: dict[str, Any] = {
        metric: rounded(summary["means"]["best"][metric]) for metric in METRICS
    }
    report["num_examples"] = summary["num_examples"]
    report["references_per_example"] = {
        "min": min(references_per_example),
        "max": max(references_per_example),
        "mean": rounded(float(np.mean(references_per_example))),
    }
    report["protocols"] = {
        REPORT_PROTOCOL_NAMES[protocol]: {
            metric: rounded(summary["means"][protocol][metric]) for metric in METRICS
        }
        for protocol in PROTOCOLS
    }
    report["confidence_intervals"] = {
        REPORT_PROTOCOL_NAMES[protocol]: {
            metric: [rounded(bound) for bound in summary["confidence_intervals"][protocol][metric]]
            for metric in METRICS
        }
        for protocol in PROTOCOLS
    }
    report["protocol_descriptions"] = dict(PROTOCOL_DESCRIPTIONS)
    report["bootstrap"] = summary["bootstrap"]
    return report


def format_table(report: dict[str, Any]) -> str:
    """Render a `rouge_report` as a console table: metrics by protocol, CI for best."""
    confidence_percent = round(100 * report["bootstrap"]["confidence"])
    headers = [
        "metric",
        f"best_reference [{confidence_percent}% CI]",
        "mean_over_references",
        "first_reference",
    ]
    rows = []
    for metric in METRICS:
        low, high = report["confidence_intervals"]["best_reference"][metric]
        rows.append(
            [
                metric,
                f"{report['protocols']['best_reference'][metric]:.2f} [{low:.2f}, {high:.2f}]",
                f"{report['protocols']['mean_over_references'][metric]:.2f}",
                f"{report['protocols']['first_reference'][metric]:.2f}",
            ]
        )
    widths = [max(len(row[column]) for row in [headers, *rows]) for column in range(4)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    refs = report.get("references_per_example", {})
    title = f"ROUGE F x100 over {report['num_examples']} examples"
    if refs:
        title += f" ({refs['min']}-{refs['max']} references each)"
    rule = "-" * len(line(headers))
    return "\n".join([title, line(headers), rule, *(line(row) for row in rows)])
