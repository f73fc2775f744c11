"""Exact, offline ROUGE for dialogue summarisation, with multi-reference protocols and CIs.

Why not call `evaluate.load("rouge")` here: it downloads its script from the Hub (fails on
offline compute nodes), and with its default `use_aggregator=True` it reports
`BootstrapAggregator().mid`, the *median of unseeded bootstrap means*, not the mean, so the
number moves from run to run. Here every headline number is the plain mean over examples and
the bootstrap only gives a seeded CI. The `evaluate` protocol below reproduces what the
metric script computes, with `rouge_score` directly, so that no download is ever needed
(tests/test_evaluate_compat.py loads the real script and checks per-example equality).

Scores come from `rouge_score.RougeScorer(..., use_stemmer=S)`, which is what `evaluate`
wraps; S is the run's `rouge.use_stemmer` (default true, as in the transformers summarisation
examples and the FLAN-T5/DialogSum course lab; `evaluate`'s own default is false). F x 100.

Four protocols, because DialogSum's test split has 3 references per dialogue while the Hub
copy flattens it to 1500 single-reference rows, and the numbers differ:
  best     -- max F over references (what `RougeScorer.score_multi` and the multi-reference
              ROUGE literature report: a summary is as good as the closest human summary);
  mean     -- mean F over references (rewards matching all annotators, lower than best);
  first    -- F against references[0] only (what a single-reference evaluation gives);
  evaluate -- `evaluate`'s rouge script with use_aggregator=False: `score_multi` on the texts
              as given. Equal to best for rouge1/rouge2/rougeL (the tokenizer reads '\n' as a
              separator); rougeLsum differs, as the script splits no sentences.
best/mean/first put each sentence on its own line before scoring, as rougeLsum expects.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
from rouge_score import rouge_scorer

METRICS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PROTOCOLS: tuple[str, ...] = ("best", "mean", "first", "evaluate")

# Names used in the report, so a reader of the JSON does not have to guess what "best" means.
REPORT_PROTOCOL_NAMES: dict[str, str] = {
    "best": "best_reference",
    "mean": "mean_over_references",
    "first": "first_reference",
    "evaluate": "evaluate",
}
# The protocol whose means are the report's top-level rouge1..rougeLsum unless told otherwise.
DEFAULT_HEADLINE = "best_reference"


def protocol_descriptions(use_stemmer: bool) -> dict[str, str]:
    """How each protocol is computed and which `evaluate` call it equals, for rouge.json."""
    stem = f"use_stemmer={use_stemmer}"
    split = "sentences split one per line for rougeLsum (clustertune's regex splitter)"
    return {
        "best_reference": "Per example and per metric, the highest F-measure over its references "
        f"(rouge_score's RougeScorer.score_multi), {split}. rouge1/rouge2/rougeL equal the "
        "evaluate protocol; rougeLsum differs because evaluate's script splits no sentences.",
        "mean_over_references": f"Per example, the mean F-measure over its references, {split}.",
        "first_reference": "Per example, the F-measure against its first reference only (what a "
        f"single-reference copy of the data set gives), {split}. rouge1/rouge2/rougeL equal "
        "the mean of evaluate.load('rouge').compute(predictions, first references, "
        f"{stem}, use_aggregator=False); with use_stemmer=True this is the course-lab protocol.",
        "evaluate": "The exact mean over examples of evaluate.load('rouge').compute(predictions, "
        f"references, {stem}, use_aggregator=False) x 100: per example score_multi (max "
        "F-measure over the references, per metric) on the texts as given, so rougeLsum splits "
        "only at newlines already in the text. Not the use_aggregator=True figure, which is the "
        "median of an unseeded bootstrap of the mean and moves between runs.",
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


@functools.cache
def _scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
    """One scorer per stemmer setting and process: it is stateless across calls. Built as the
    evaluate script builds it (default tokenizer: lower-case, [a-z0-9]+ tokens)."""
    return rouge_scorer.RougeScorer(list(METRICS), use_stemmer=use_stemmer)


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


def score_example(
    prediction: str, references: list[str], *, use_stemmer: bool = True
) -> dict[str, Any]:
    """Score one prediction against its references under the four protocols.

    Returns {"per_reference": [{metric: F}, ...], "best": {metric: F}, "mean": {...},
    "first": {...}, "evaluate": {...}, "best_reference_index": {metric: i}}, F in [0, 100].
    """
    if isinstance(references, str):
        raise ValueError(
            "references must be a list of strings, got a single string; wrap it as [reference]."
        )
    if len(references) == 0:
        raise ValueError("references is empty; every prediction needs at least one reference.")

    scorer = _scorer(use_stemmer)
    # Split once for all four metrics: the tokenizer maps every non-alphanumeric character,
    # '\n' included, to a separator, so rouge1/rouge2/rougeL are unchanged by the newlines
    # and only rougeLsum (which reads '\n' as a sentence boundary) sees them.
    split_prediction = split_sentences(prediction)
    per_reference = []
    for reference in references:
        scores = scorer.score(split_sentences(reference), split_prediction)
        per_reference.append({metric: 100.0 * scores[metric].fmeasure for metric in METRICS})

    best: dict[str, float] = {}
    best_index: dict[str, int] = {}
    for metric in METRICS:
        values = [scores[metric] for scores in per_reference]
        # np.argmax, as in score_multi: the first reference wins a tie, and each metric
        # picks its own reference (rouge1's best may be a different reference than rouge2's).
        best_index[metric] = int(np.argmax(values))
        best[metric] = values[best_index[metric]]
    # What evaluate's rouge script does per example (references as a list: score_multi), on
    # the unsplit texts. Only its rougeLsum can differ from `best`, but the script's own call
    # is repeated whole so the equality does not rest on that argument.
    as_evaluate = scorer.score_multi(list(references), prediction)
    return {
        "per_reference": per_reference,
        "best": best,
        "mean": {m: float(np.mean([s[m] for s in per_reference])) for m in METRICS},
        "first": dict(per_reference[0]),
        "evaluate": {metric: 100.0 * as_evaluate[metric].fmeasure for metric in METRICS},
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
    predictions: list[str],
    references: list[list[str]],
    *,
    use_stemmer: bool = True,
    headline: str = DEFAULT_HEADLINE,
    **aggregate_kwargs: Any,
) -> dict[str, Any]:
    """Score a whole evaluation set; JSON-ready, values rounded to 4 decimals.

    Top-level rouge1/rouge2/rougeL/rougeLsum are the means of the `headline` protocol (a
    report name: best_reference by default, the usual multi-reference number).
    `aggregate_kwargs` go to `aggregate` (confidence, num_bootstrap, seed).
    """
    if headline not in REPORT_PROTOCOL_NAMES.values():
        raise ValueError(
            f"headline must be one of {', '.join(REPORT_PROTOCOL_NAMES.values())}, got {headline!r}."
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass exactly one list of references per prediction."
        )
    per_example = [
        score_example(prediction, example_references, use_stemmer=use_stemmer)
        for prediction, example_references in zip(predictions, references, strict=True)
    ]
    summary = aggregate(per_example, **aggregate_kwargs)
    references_per_example = [len(example_references) for example_references in references]

    def rounded(value: float) -> float:
        return round(value, 4)

    protocols = {
        REPORT_PROTOCOL_NAMES[protocol]: {
            metric: rounded(summary["means"][protocol][metric]) for metric in METRICS
        }
        for protocol in PROTOCOLS
    }
    report: dict[str, Any] = {metric: protocols[headline][metric] for metric in METRICS}
    report["headline_protocol"] = headline
    report["use_stemmer"] = use_stemmer
    report["num_examples"] = summary["num_examples"]
    report["references_per_example"] = {
        "min": min(references_per_example),
        "max": max(references_per_example),
        "mean": rounded(float(np.mean(references_per_example))),
    }
    report["protocols"] = protocols
    report["confidence_intervals"] = {
        REPORT_PROTOCOL_NAMES[protocol]: {
            metric: [rounded(bound) for bound in summary["confidence_intervals"][protocol][metric]]
            for metric in METRICS
        }
        for protocol in PROTOCOLS
    }
    # Keyed like `protocols`; `headline_protocol` names the one the top-level numbers repeat.
    report["protocol_descriptions"] = protocol_descriptions(use_stemmer)
    report["bootstrap"] = summary["bootstrap"]
    return report


def format_table(report: dict[str, Any]) -> str:
    """Render a `rouge_report` as a console table: metrics by protocol, the headline first
    with its CI. Reports written before protocols.evaluate existed render without it."""
    confidence_percent = round(100 * report["bootstrap"]["confidence"])
    headline = report.get("headline_protocol", DEFAULT_HEADLINE)
    others = [
        p for p in REPORT_PROTOCOL_NAMES.values() if p != headline and p in report["protocols"]
    ]
    headers = ["metric", f"{headline} [{confidence_percent}% CI]", *others]
    rows = []
    for metric in METRICS:
        low, high = report["confidence_intervals"][headline][metric]
        rows.append(
            [
                metric,
                f"{report['protocols'][headline][metric]:.2f} [{low:.2f}, {high:.2f}]",
                *(f"{report['protocols'][protocol][metric]:.2f}" for protocol in others),
            ]
        )
    widths = [max(len(row[column]) for row in [headers, *rows]) for column in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    refs = report.get("references_per_example", {})
    title = f"ROUGE F x100 over {report['num_examples']} examples"
    if refs:
        title += f" ({refs['min']}-{refs['max']} references each)"
    title += f", stemmer {'on' if report.get('use_stemmer', True) else 'off'}, headline {headline}"
    rule = "-" * len(line(headers))
    lines = [title, line(headers), rule, *(line(row) for row in rows)]
    if "evaluate" in report["protocols"]:
        lines.append(
            "evaluate: exact mean of evaluate's per-example F (use_aggregator=False), "
            "not its bootstrap median"
        )
    return "\n".join(lines)
