"""Comparing evaluations side by side, from their rouge.json files alone (no model needed).

- `load_report`: one evaluation output_dir's rouge.json.
- `comparison_table`: the Markdown table: best-reference ROUGE [95% CI] per run and the
  change against the first run, the other protocols, examples and examples/s.
- `_comparison_caveats`: warnings when runs were scored on different data or prompts.
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

from clustertune import rouge
from clustertune.atomicio import atomic_path, write_text_atomic
from clustertune.errors import UserError


def load_report(eval_dir: str | Path) -> dict[str, Any]:
    path = Path(eval_dir) / "rouge.json"
    if not path.is_file():
        raise UserError(f"--compare: '{eval_dir}' has no rouge.json; give evaluation output_dirs.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--compare: {path} is not valid JSON ({error}).") from None


def comparison_table(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Markdown table: best-reference ROUGE [95% CI] per run, the other protocols, and the
    change against the first run (the seed's "absolute improvement over the original model")."""
    header = ["metric", *labels]
    rows = []
    for metric in rouge.METRICS:
        base = reports[0][metric]
        cells = [metric]
        for index, report in enumerate(reports):
            low, high = report["confidence_intervals"]["best_reference"][metric]
            cell = f"{report[metric]:.2f} [{low:.2f}, {high:.2f}]"
            if index:
                cell += f" ({report[metric] - base:+.2f})"
            cells.append(cell)
        rows.append(cells)
    for protocol in ("mean_over_references", "first_reference"):
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
    return caveats


def plot_comparison(
    reports: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path
) -> None:
    """Grouped bars per metric, one per run, with the 95% bootstrap interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rouge.METRICS))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(rouge.METRICS), 4.5))
    for index, (label, report) in enumerate(zip(labels, reports, strict=True)):
        values = np.array([report[m] for m in rouge.METRICS])
        ci = np.array([report["confidence_intervals"]["best_reference"][m] for m in rouge.METRICS])
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
    ax.set_ylabel("ROUGE F x100 (best reference, 95% CI)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _check_output_folder(out_dir: str | Path) -> Path:
    """--out must name a folder (or a path where one can be made): refused before any
    report is read, and created only once every report has loaded."""
    out = Path(out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        which = "is a file" if blocking == out else f"is inside '{blocking}', which is a file"
        raise UserError(
            f"--out '{out_dir}' {which}; --out names a folder (it gets comparison.md and "
            "comparison.png), e.g. --out outputs/compare."
        )
    return out


def compare_runs(
    eval_dirs: Sequence[str], labels: Sequence[str] | None, out_dir: str | Path
) -> str:
    """Side-by-side table of several evaluations; writes comparison.md and comparison.png."""
    if len(eval_dirs) < 1:
        raise UserError("--compare needs at least one evaluation output_dir.")
    labels = list(labels) if labels else [Path(d).name for d in eval_dirs]
    if len(labels) != len(eval_dirs):
        raise UserError(
            f"--labels has {len(labels)} names for {len(eval_dirs)} folders; give one label per folder."
        )
    out = _check_output_folder(out_dir)
    reports = [load_report(d) for d in eval_dirs]
    table = comparison_table(reports, labels)
    caveats = _comparison_caveats(reports, labels)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"--out '{out_dir}' cannot be created ({error.strerror}); give a folder you can write."
        ) from None
    first = reports[0].get("dataset", {})
    markdown = "\n".join(
        [
            "# ROUGE comparison",
            "",
            f"Data: {first.get('source')} ({first.get('num_examples')} examples, references {first.get('reference_columns')}). "
            "ROUGE F x100 with stemming; headline rows take the best reference per example, with a seeded 95% "
            f"bootstrap interval; (+x) is the change against {labels[0]}.",
            "",
            table,
            "",
            *(f"- warning: {c}" for c in caveats),
            *(f"- {label}: `{d}`" for label, d in zip(labels, eval_dirs, strict=True)),
            "",
        ]
    )
    write_text_atomic(out / "comparison.md", markdown)
    plot_comparison(reports, labels, out / "comparison.png")
    return "\n".join([table, *(f"warning: {c}" for c in caveats)])


def compare_main(argv: Sequence[str], prog: str, dirs_option: str | None = None) -> int:
    """Parse `argv`, compare, print the table and where it was written. The evaluation folders
    are positional arguments, or follow `dirs_option` (e.g. "--compare") where it is given."""
    parser = argparse.ArgumentParser(prog=prog, description="Compare evaluation outputs.")
    dirs_help = "evaluation output_dirs (rouge.json)"
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
    args = parser.parse_args(list(argv))
    labels = args.labels.split(",") if args.labels else None
    print(compare_runs(args.eval_dirs, labels, args.out), flush=True)
    print(f"wrote {args.out}/comparison.md and {args.out}/comparison.png", flush=True)
    return 0
