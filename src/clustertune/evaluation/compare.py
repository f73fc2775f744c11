"""Comparing evaluations side by side, from their rouge.json and predictions.jsonl (no model).

- `load_report`: one evaluation output_dir's rouge.json.
- `comparison_table`: the Markdown table: headline ROUGE [95% CI] per run (the first run's
  headline protocol, best_reference by default) and the change against the first run, the
  other protocols, examples and examples/s.
- `load_example_scores`, `paired_differences`, `differences_table`: the paired bootstrap of
  each run minus the first on the same example ids, from the per-example scores in
  predictions.jsonl: mean difference, its 95% CI and a two-sided p-value per metric.
- `_comparison_caveats`: warnings when runs were scored on different data, prompts or stemmer.
- `plot_comparison`: comparison.png, grouped bars with the bootstrap intervals.
- `compare_runs`: all of it for a list of folders: writes comparison.md and comparison.png.
- `compare_main`: the command line shared by recipes/compare.py (folders as arguments) and
  `recipes/evaluate.py --compare` (folders after --compare).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clustertune import rouge
from clustertune.atomicio import atomic_path, write_text_atomic
from clustertune.errors import UserError
from clustertune.run_folder import (
    EvalFolder,
    evaluation_evidence,
    inside_run_part,
    training_run_evidence,
)


def load_report(eval_dir: str | Path) -> dict[str, Any]:
    path = EvalFolder(Path(eval_dir)).rouge
    if not path.is_file():
        raise UserError(f"--compare: '{eval_dir}' has no rouge.json; give evaluation output_dirs.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--compare: {path} is not valid JSON ({error}).") from None


def headline_protocol(report: Mapping[str, Any]) -> str:
    """The protocol a report's top-level numbers repeat (reports from before the key existed
    were best-reference)."""
    return report.get("headline_protocol", rouge.DEFAULT_HEADLINE)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def comparison_table(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Markdown table: headline ROUGE [95% CI] per run, the other protocols, and the change
    against the first run (the seed's "absolute improvement over the original model"). Every
    run is read under the first run's headline protocol, so the columns measure one thing."""
    headline = headline_protocol(reports[0])
    header = ["metric", *labels]
    rows = []
    for metric in rouge.METRICS:
        base = reports[0]["protocols"][headline][metric]
        cells = [metric]
        for index, report in enumerate(reports):
            value = report["protocols"][headline][metric]
            low, high = report["confidence_intervals"][headline][metric]
            cell = f"{value:.2f} [{low:.2f}, {high:.2f}]"
            if index:
                cell += f" ({value - base:+.2f})"
            cells.append(cell)
        rows.append(cells)
    others = [
        protocol
        for protocol in rouge.REPORT_PROTOCOL_NAMES.values()
        if protocol != headline and all(protocol in r["protocols"] for r in reports)
    ]
    for protocol in others:
        for metric in ("rouge1", "rougeL"):
            rows.append(
                [
                    f"{metric} ({protocol})",
                    *(f"{r['protocols'][protocol][metric]:.2f}" for r in reports),
                ]
            )
    rows.append(["examples", *(str(r["num_examples"]) for r in reports)])
    rows.append(
        [
            "examples/s",
            *(
                f"{r.get('throughput', {}).get('examples_per_second', float('nan')):.2f}"
                for r in reports
            ),
        ]
    )
    return _markdown(header, rows)


# ------------------------------------------------------- paired differences on the same examples


def load_example_scores(eval_dir: str | Path, protocol: str) -> dict[str, dict[str, float]] | None:
    """{example id: {metric: F}} under `protocol`, from predictions.jsonl (None: no such file,
    e.g. a folder that only holds a rouge.json). The scores there are rounded to 4 decimals."""
    path = EvalFolder(Path(eval_dir)).predictions
    if not path.is_file():
        return None
    scores: dict[str, dict[str, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            example_id, example = str(record["id"]), record["scores"][protocol]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"--compare: {path} line {number} has no id or no '{protocol}' scores "
                f"({type(error).__name__}: {error}); re-run the evaluation to rewrite it."
            ) from None
        if example_id in scores:
            raise UserError(f"--compare: {path} lists example id '{example_id}' twice.")
        scores[example_id] = {metric: float(example[metric]) for metric in rouge.METRICS}
    return scores


def check_same_ids(
    per_run: Sequence[Mapping[str, Any]], labels: Sequence[str], eval_dirs: Sequence[str]
) -> None:
    """Paired differences need every run scored on the same example ids (in any order)."""
    first = set(per_run[0])
    for label, eval_dir, scores in zip(labels[1:], eval_dirs[1:], per_run[1:], strict=True):
        ids = set(scores)
        if ids == first:
            continue
        missing, extra = sorted(first - ids), sorted(ids - first)
        parts = [f"{len(missing)} of {labels[0]}'s ids missing"] if missing else []
        parts += [f"{len(extra)} ids {labels[0]} lacks"] if extra else []
        example = f"e.g. '{(missing or extra)[0]}'"
        raise UserError(
            f"--compare: {label} ('{eval_dir}') was not evaluated on the same example ids as "
            f"{labels[0]} ({', '.join(parts)}, {example}); paired differences need the same "
            "examples: evaluate both with the same data.eval_file, split and max_examples."
        )


def paired_differences(
    first: Mapping[str, Mapping[str, float]],
    other: Mapping[str, Mapping[str, float]],
    resample_indices: np.ndarray,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per metric, `other` minus `first` on the same examples: the mean difference, a
    percentile-bootstrap CI and a two-sided p-value.

    Each replicate averages the per-example differences over one row of `resample_indices`
    (positions in `first`'s id order), so both systems are always resampled on the same
    examples, and every pair of a comparison uses the same replicates. The p-value inverts
    the same percentile interval: 2 x the share of replicates on the far side of 0 (counting
    0 on both sides, +1 in numerator and denominator so it is never 0): p < 1 - confidence
    exactly when the CI excludes 0, up to that +1. Identical systems give [0, 0] and p = 1.
    """
    ids = list(first)
    num_bootstrap = resample_indices.shape[0]
    tail = 100.0 * (1.0 - confidence) / 2.0
    result: dict[str, dict[str, Any]] = {}
    for metric in rouge.METRICS:
        differences = np.array([other[i][metric] - first[i][metric] for i in ids])
        replicates = differences[resample_indices].mean(axis=1)
        low, high = np.percentile(replicates, [tail, 100.0 - tail])
        far_side = min(int((replicates <= 0).sum()), int((replicates >= 0).sum()))
        result[metric] = {
            "mean_difference": round(float(differences.mean()), 4),
            "confidence_interval": [round(float(low), 4), round(float(high), 4)],
            "p_value": round(min(1.0, 2.0 * (far_side + 1) / (num_bootstrap + 1)), 4),
        }
    return result


def differences_table(
    differences: Sequence[Mapping[str, Mapping[str, Any]]], labels: Sequence[str]
) -> str:
    """Markdown: one column per run after the first, `mean diff [95% CI] p=...` per metric."""
    header = ["metric", *(f"{label} - {labels[0]}" for label in labels[1:])]
    rows = []
    for metric in rouge.METRICS:
        cells = [metric]
        for difference in differences:
            d = difference[metric]
            low, high = d["confidence_interval"]
            cells.append(
                f"{d['mean_difference']:+.2f} [{low:+.2f}, {high:+.2f}] p={d['p_value']:.3f}"
            )
        rows.append(cells)
    return _markdown(header, rows)


def _comparison_caveats(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    caveats = []
    first = reports[0].get("dataset", {})
    for label, report in zip(labels[1:], reports[1:], strict=True):
        other = report.get("dataset", {})
        for key in ("source", "split", "num_examples", "reference_columns", "prompt_template"):
            if other.get(key) != first.get(key):
                caveats.append(
                    f"{label} differs from {labels[0]} in dataset.{key}: the scores are not comparable as they stand."
                )
        if report.get("use_stemmer", True) != reports[0].get("use_stemmer", True):
            caveats.append(
                f"{label} differs from {labels[0]} in use_stemmer: stemming changes every score, "
                "so the scores are not comparable as they stand."
            )
        if headline_protocol(report) != headline_protocol(reports[0]):
            caveats.append(
                f"{label} has headline_protocol {headline_protocol(report)}: it is shown under "
                f"{labels[0]}'s, {headline_protocol(reports[0])}."
            )
    return caveats


def plot_comparison(
    reports: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path
) -> None:
    """Grouped bars per metric, one per run, with the 95% bootstrap interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = headline_protocol(reports[0])
    x = np.arange(len(rouge.METRICS))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(rouge.METRICS), 4.5))
    for index, (label, report) in enumerate(zip(labels, reports, strict=True)):
        values = np.array([report["protocols"][headline][m] for m in rouge.METRICS])
        ci = np.array([report["confidence_intervals"][headline][m] for m in rouge.METRICS])
        errors = np.abs(ci.T - values)
        bars = ax.bar(
            x + (index - (len(reports) - 1) / 2) * width,
            values,
            width,
            yerr=errors,
            capsize=3,
            label=label,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, rouge.METRICS)
    ax.set_ylabel(f"ROUGE F x100 ({headline}, 95% CI)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _check_output_folder(out_dir: str | Path, overwrite: bool = False) -> Path:
    """--out must name a folder (or a path where one can be made) that is not a training run's
    or inside one, and not an evaluation's (unless overwrite): refused before any report is
    read, and created only once every report has loaded. An earlier comparison is replaced."""
    out = Path(out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        which = "is a file" if blocking == out else f"is inside '{blocking}', which is a file"
        raise UserError(
            f"--out '{out_dir}' {which}; --out names a folder (it gets comparison.md and "
            "comparison.png), e.g. --out outputs/compare."
        )
    run_files = training_run_evidence(out)
    where = inside_run_part(out)
    if run_files or where is not None:
        what = f"holds a training run's files ({', '.join(run_files)})" if run_files else where
        raise UserError(
            f"--out '{out_dir}' {what}, which a comparison must not write into; give it a "
            "folder of its own, e.g. --out outputs/compare."
        )
    results = evaluation_evidence(out)
    if results and not overwrite:
        raise UserError(
            f"--out '{out_dir}' holds an evaluation's results ({', '.join(results)}), beside "
            "which its comparison.md and comparison.png would be replaced; give a folder of its "
            "own (e.g. --out outputs/compare), or --overwrite to write there anyway."
        )
    return out


def compare_runs(
    eval_dirs: Sequence[str],
    labels: Sequence[str] | None,
    out_dir: str | Path,
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    checked_out: bool = True,
) -> str:
    """Side-by-side table of several evaluations and the paired differences against the first;
    writes comparison.md and comparison.png. Every input is read and checked before anything
    is written. checked_out=False: `out_dir` is the job's own output_dir (a multi-adapter
    evaluation writes its comparison beside its systems' folders)."""
    if len(eval_dirs) < 1:
        raise UserError("--compare needs at least one evaluation output_dir.")
    if num_bootstrap < 1:
        raise UserError(f"--num_bootstrap={num_bootstrap} must be >= 1, e.g. 1000.")
    labels = list(labels) if labels else [Path(d).name for d in eval_dirs]
    if len(labels) != len(eval_dirs):
        raise UserError(
            f"--labels has {len(labels)} names for {len(eval_dirs)} folders; give one label per folder."
        )
    out = _check_output_folder(out_dir, overwrite) if checked_out else Path(out_dir)
    reports = [load_report(d) for d in eval_dirs]
    headline = headline_protocol(reports[0])
    table = comparison_table(reports, labels)
    caveats = _comparison_caveats(reports, labels)
    paired, paired_note = _paired_section(reports, labels, eval_dirs, headline, num_bootstrap, seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"--out '{out_dir}' cannot be created ({error.strerror}); give a folder you can write."
        ) from None
    first = reports[0].get("dataset", {})
    stemming = "with" if reports[0].get("use_stemmer", True) else "without"
    # The differences as their own table under their sentence, or the sentence saying why not.
    paired_section = [paired_note, "", paired, ""] if paired else []
    if paired_note and not paired:
        paired_section = [f"- {paired_note}"]
    markdown = "\n".join(
        [
            "# ROUGE comparison",
            "",
            f"Data: {first.get('source')} ({first.get('num_examples')} examples, references {first.get('reference_columns') or 'the last assistant turn'}). "
            f"ROUGE F x100 {stemming} stemming; headline rows are protocols.{headline} (rouge.json's "
            "protocol_descriptions says how it is computed), with a seeded 95% bootstrap interval; "
            f"(+x) is the change against {labels[0]}.",
            "",
            table,
            "",
            *paired_section,
            *(f"- warning: {c}" for c in caveats),
            *(f"- {label}: `{d}`" for label, d in zip(labels, eval_dirs, strict=True)),
            "",
        ]
    )
    write_text_atomic(EvalFolder(out).comparison_md, markdown)
    plot_comparison(reports, labels, EvalFolder(out).comparison_png)
    printed = [table]
    if paired_note:
        printed += ["", paired_note]
    if paired:
        printed += ["", paired]
    return "\n".join([*printed, *(f"warning: {c}" for c in caveats)])


def _paired_section(
    reports: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    eval_dirs: Sequence[str],
    headline: str,
    num_bootstrap: int,
    seed: int,
) -> tuple[str, str]:
    """(differences table, the sentence above it), or ("", why there is none). Refuses runs
    scored on different example ids."""
    if len(reports) < 2:
        return "", ""
    per_run = [load_example_scores(d, headline) for d in eval_dirs]
    lacking = [d for d, scores in zip(eval_dirs, per_run, strict=True) if scores is None]
    if lacking:
        return "", (
            f"paired differences skipped: '{lacking[0]}' has no predictions.jsonl "
            "(the per-example scores they need)."
        )
    check_same_ids(per_run, labels, eval_dirs)
    num_examples = len(per_run[0])
    # One set of resampled example ids for every run and metric: each replicate compares the
    # systems on the same examples. (num_bootstrap, n) int64: 1000 x 1500 rows = 12 MB.
    resample_indices = np.random.default_rng(seed).integers(
        0, num_examples, size=(num_bootstrap, num_examples)
    )
    differences = [paired_differences(per_run[0], other, resample_indices) for other in per_run[1:]]
    note = (
        f"Paired differences against {labels[0]} (protocols.{headline}, per example on the same "
        f"{num_examples} example ids): mean difference [95% percentile-bootstrap CI] and two-sided "
        f"p-value, from {num_bootstrap} resamples of the example ids (seed {seed}), the same "
        "resamples for every run; per-example scores from predictions.jsonl (rounded to 4 decimals)."
    )
    return differences_table(differences, labels), note


def compare_main(argv: Sequence[str], prog: str, dirs_option: str | None = None) -> int:
    """Parse `argv`, compare, print the table and where it was written. The evaluation folders
    are positional arguments, or follow `dirs_option` (e.g. "--compare") where it is given."""
    parser = argparse.ArgumentParser(prog=prog, description="Compare evaluation outputs.")
    dirs_help = "evaluation output_dirs (rouge.json, predictions.jsonl)"
    if dirs_option is None:
        parser.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR", help=dirs_help)
    else:
        parser.add_argument(
            dirs_option,
            dest="eval_dirs",
            nargs="+",
            required=True,
            metavar="EVAL_DIR",
            help=dirs_help,
        )
    parser.add_argument(
        "--labels", help="comma-separated names, one per folder (default: folder names)"
    )
    parser.add_argument(
        "--out", default="outputs/compare", help="folder for comparison.md and comparison.png"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds an evaluation's results (its comparison is replaced)",
    )
    parser.add_argument(
        "--num_bootstrap",
        type=int,
        default=1000,
        help="resamples for the paired differences (the smallest p-value is 2 / (N + 1))",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the paired bootstrap")
    args = parser.parse_args(list(argv))
    labels = args.labels.split(",") if args.labels else None
    text = compare_runs(
        args.eval_dirs,
        labels,
        args.out,
        num_bootstrap=args.num_bootstrap,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    out = EvalFolder(Path(args.out))
    print(text, flush=True)
    print(f"wrote {out.comparison_md} and {out.comparison_png}", flush=True)
    return 0
