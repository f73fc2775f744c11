"""--compare's paired bootstrap of the difference between each run and the first, on
constructed evaluation folders where the answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import describe, launch_command, run

from clustertune import rouge
from clustertune.errors import UserError
from clustertune.evaluation.compare import compare_runs, paired_differences
from clustertune.evaluation.report import example_scores

REFERENCES = [
    ["the cat sat on the mat", "a cat was on the mat"],
    ["a dog ran in the park", "the dog was running"],
    ["#Person1# buys a coat.", "#Person1# wants a new coat."],
    ["they meet at noon", "the two will meet at twelve"],
    ["she books a flight to paris", "#Person2# flies to paris"],
    ["he lost his keys", "the keys are lost"],
]
# Per example, a weaker and a stronger prediction: the strong one shares more words.
WEAK = ["a mat", "the park", "coat", "noon", "paris", "keys"]
STRONG = [
    "the cat sat on a mat",
    "a dog ran in a park",
    "#Person1# buys a coat",
    "they meet at noon today",
    "she books a flight to paris",
    "he lost his keys again",
]


def make_eval(folder: Path, predictions: list[str], ids: list[str] | None = None) -> Path:
    """An evaluation folder as recipes/evaluate.py writes it: rouge.json and predictions.jsonl."""
    ids = ids or [f"test_{i}" for i in range(len(predictions))]
    folder.mkdir(parents=True)
    report = rouge.rouge_report(predictions, REFERENCES[: len(predictions)], num_bootstrap=50)
    report["dataset"] = {"source": "test.jsonl", "num_examples": len(predictions)}
    report["throughput"] = {"examples_per_second": 1.0}
    (folder / "rouge.json").write_text(json.dumps(report))
    lines = [
        json.dumps(
            {
                "id": example_id,
                "prediction": prediction,
                "references": references,
                "scores": example_scores(prediction, references),
            }
        )
        for example_id, prediction, references in zip(ids, predictions, REFERENCES, strict=False)
    ]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def scores(values: list[float]) -> dict[str, dict[str, float]]:
    return {f"e{i}": {metric: v for metric in rouge.METRICS} for i, v in enumerate(values)}


def resamples(n: int, num_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(num_bootstrap, n))


def test_equal_systems_difference_is_zero_with_p_one():
    base = scores([10.0, 30.0, 55.0, 70.0])
    result = paired_differences(base, base, resamples(4))
    for metric in rouge.METRICS:
        assert result[metric] == {
            "mean_difference": 0.0,
            "confidence_interval": [0.0, 0.0],
            "p_value": 1.0,
        }


def test_differences_that_cancel_give_a_ci_around_zero_and_a_large_p():
    # Each example's difference is matched by its negative: the true mean difference is 0.
    rng = np.random.default_rng(7)
    base_values = rng.uniform(20, 60, size=200)
    offsets = rng.uniform(0, 10, size=100)
    other_values = base_values + np.concatenate([offsets, -offsets])
    result = paired_differences(
        scores(list(base_values)), scores(list(other_values)), resamples(200)
    )
    for metric in rouge.METRICS:
        low, high = result[metric]["confidence_interval"]
        assert abs(result[metric]["mean_difference"]) < 1e-9
        assert low < 0.0 < high
        assert result[metric]["p_value"] > 0.5


def test_always_better_by_a_little_is_significant_although_the_cis_overlap():
    # +0.5 on every example, against per-example scores spread over 40 points: the two
    # systems' own CIs overlap widely, yet the paired test sees a sure improvement.
    base_values = list(np.linspace(20, 60, 100))
    result = paired_differences(
        scores(base_values), scores([v + 0.5 for v in base_values]), resamples(100)
    )
    for metric in rouge.METRICS:
        assert result[metric]["mean_difference"] == pytest.approx(0.5)
        assert result[metric]["confidence_interval"] == pytest.approx([0.5, 0.5])
        assert result[metric]["p_value"] == pytest.approx(2 / 1001, abs=1e-4)
        assert result[metric]["p_value"] < 0.05


def test_a_system_better_on_some_examples_only_has_a_ci_inside_its_range():
    base_values = [30.0] * 50
    other_values = [30.0 + (4.0 if i % 2 else 0.0) for i in range(50)]  # mean +2
    result = paired_differences(scores(base_values), scores(other_values), resamples(50))
    low, high = result["rouge1"]["confidence_interval"]
    assert result["rouge1"]["mean_difference"] == pytest.approx(2.0)
    assert 0.0 < low < 2.0 < high < 4.0 and result["rouge1"]["p_value"] < 0.05


def test_compare_prints_and_writes_the_paired_differences(tmp_path):
    base = make_eval(tmp_path / "base", WEAK)
    same = make_eval(tmp_path / "same", WEAK)
    # Paired by id, not by line: the same run with its lines in the opposite order.
    lines = (same / "predictions.jsonl").read_text().splitlines()
    (same / "predictions.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    strong = make_eval(tmp_path / "strong", STRONG)
    text = compare_runs(
        [str(base), str(same), str(strong)], ["base", "same", "strong"], tmp_path / "cmp", seed=3
    )
    assert "Paired differences against base (protocols.best_reference" in text
    differences = text.split("Paired differences against base")[1]
    assert "same - base" in differences and "strong - base" in differences
    rows = {r.split("|")[1].strip(): r for r in differences.splitlines() if r.startswith("|")}
    assert "+0.00 [+0.00, +0.00] p=1.000" in rows["rouge1"]
    # strong beats weak on every one of the 6 examples: the smallest p 1000 resamples give.
    assert "p=0.002" in rows["rouge1"].split("|")[3]
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Paired differences against base" in markdown and "strong - base" in markdown
    # The same seed gives the same table; the bootstrap is not re-drawn per call.
    again = compare_runs(
        [str(base), str(same), str(strong)], ["base", "same", "strong"], tmp_path / "cmp2", seed=3
    )
    assert again == text


def test_compare_refuses_runs_on_different_example_ids_before_writing(tmp_path):
    base = make_eval(tmp_path / "base", WEAK)
    other = make_eval(tmp_path / "other", STRONG[:5])  # one example fewer
    renamed = make_eval(tmp_path / "renamed", STRONG, ids=[f"x_{i}" for i in range(6)])
    with pytest.raises(UserError, match="other .* was not evaluated on the same example ids") as e:
        compare_runs([str(base), str(other)], None, tmp_path / "cmp")
    assert "1 of base's ids missing" in str(e.value) and "'test_5'" in str(e.value)
    with pytest.raises(UserError, match="6 of base's ids missing, 6 ids base lacks"):
        compare_runs([str(base), str(renamed)], None, tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()

    result = run(
        launch_command(
            "recipes/compare.py", [str(base), str(other), "--out", str(tmp_path / "cli")]
        )
    )
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clustertune: error: --compare: other")
    assert not (tmp_path / "cli").exists()


def test_folders_without_predictions_still_compare_without_differences(tmp_path):
    base = make_eval(tmp_path / "base", WEAK)
    strong = make_eval(tmp_path / "strong", STRONG)
    (strong / "predictions.jsonl").unlink()
    text = compare_runs([str(base), str(strong)], None, tmp_path / "cmp")
    assert "paired differences skipped" in text and "has no predictions.jsonl" in text
    assert "| rouge1" in text
