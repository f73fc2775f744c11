"""protocols.evaluate equals Hugging Face `evaluate`'s rouge metric, example by example.

The real metric script is loaded from ../shared/reference/evaluate-metrics/rouge (never copied
into the project; skipped when absent), so the check runs offline. Predictions are real text
from a deterministic predictor: the first two turns of each DialogSum test dialogue, kept on
their two lines ("lead-2"), so rougeLsum also sees a newline that evaluate's script reads as a
sentence boundary. Both stemmer settings, all 3 references (score_multi) and the first one.
"""

from __future__ import annotations

import json
import typing

import pytest
from helpers import REPO, describe, launch_command, run

from clustertune import rouge
from clustertune.errors import UserError
from clustertune.evaluation import EvaluateConfig
from clustertune.evaluation.config import HeadlineProtocol, RougeSettings
from clustertune.evaluation.report import example_scores

METRIC_SCRIPT = REPO.parent / "shared" / "reference" / "evaluate-metrics" / "rouge"
DIALOGSUM_TEST = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"


def lead_two(dialogue: str) -> str:
    """The deterministic predictor: the first two turns of the dialogue, one per line."""
    return "\n".join(dialogue.split("\n")[:2])


@pytest.fixture(scope="module")
def dialogsum_test() -> tuple[list[str], list[list[str]]]:
    if not DIALOGSUM_TEST.is_file():
        pytest.skip(f"{DIALOGSUM_TEST} is absent")
    rows = [json.loads(line) for line in DIALOGSUM_TEST.read_text().splitlines()]
    predictions = [lead_two(row["dialogue"]) for row in rows]
    references = [[row["summary1"], row["summary2"], row["summary3"]] for row in rows]
    return predictions, references


@pytest.fixture(scope="module")
def evaluate_rouge():
    if not (METRIC_SCRIPT / "rouge.py").is_file():
        pytest.skip(f"{METRIC_SCRIPT} is absent")
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(str(METRIC_SCRIPT))


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_evaluate_protocol_equals_the_metric_script_per_example(
    dialogsum_test, evaluate_rouge, use_stemmer
):
    predictions, references = dialogsum_test
    assert len(predictions) == 500 and sum("\n" in p for p in predictions) == 500
    theirs = evaluate_rouge.compute(
        predictions=predictions,
        references=references,
        use_stemmer=use_stemmer,
        use_aggregator=False,
    )
    ours = [
        rouge.score_example(p, r, use_stemmer=use_stemmer)
        for p, r in zip(predictions, references, strict=True)
    ]
    largest_difference = max(
        abs(100.0 * theirs[metric][i] - ours[i]["evaluate"][metric])
        for metric in rouge.METRICS
        for i in range(len(predictions))
    )
    assert largest_difference == 0.0
    # rouge1/rouge2/rougeL are the best-reference figures; the sentence split changes rougeLsum.
    for metric in ("rouge1", "rouge2", "rougeL"):
        assert all(o["evaluate"][metric] == o["best"][metric] for o in ours)
    assert any(o["evaluate"]["rougeLsum"] != o["best"]["rougeLsum"] for o in ours)

    # The report's figure is the exact mean of evaluate's per-example lists (x 100), rounded.
    report = rouge.rouge_report(
        predictions, references, use_stemmer=use_stemmer, headline="evaluate", num_bootstrap=10
    )
    assert report["headline_protocol"] == "evaluate" and report["use_stemmer"] is use_stemmer
    for metric in rouge.METRICS:
        exact_mean = 100.0 * sum(theirs[metric]) / len(predictions)
        assert report["protocols"]["evaluate"][metric] == pytest.approx(exact_mean, abs=1e-4)
        assert report[metric] == report["protocols"]["evaluate"][metric]
    assert "use_aggregator=False" in report["protocol_descriptions"]["evaluate"]
    assert f"use_stemmer={use_stemmer}" in report["protocol_descriptions"]["evaluate"]


def test_first_reference_is_the_course_lab_call_for_rouge1_2_l(dialogsum_test, evaluate_rouge):
    """The course lab scores single references with use_stemmer=True: first_reference gives its
    rouge1/rouge2/rougeL; its rougeLsum is the evaluate protocol with one reference column."""
    predictions, references = dialogsum_test
    predictions, firsts = predictions[:100], [r[0] for r in references[:100]]
    theirs = evaluate_rouge.compute(
        predictions=predictions, references=firsts, use_stemmer=True, use_aggregator=False
    )
    for i, (prediction, first) in enumerate(zip(predictions, firsts, strict=True)):
        multi = rouge.score_example(prediction, [first, "another summary"], use_stemmer=True)
        single = rouge.score_example(prediction, [first], use_stemmer=True)
        for metric in ("rouge1", "rouge2", "rougeL"):
            assert multi["first"][metric] == 100.0 * theirs[metric][i]
        for metric in rouge.METRICS:
            assert single["evaluate"][metric] == 100.0 * theirs[metric][i]


def test_stemmer_setting_changes_the_scores_and_reaches_predictions_jsonl():
    stemmed = example_scores("the cats were running", ["the cat runs"], use_stemmer=True)
    plain = example_scores("the cats were running", ["the cat runs"], use_stemmer=False)
    # Stemmed: the, cat, run match (3 of 4 / 3 of 3); unstemmed only "the".
    assert stemmed["evaluate"]["rouge1"] == pytest.approx(100 * 2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert plain["evaluate"]["rouge1"] == pytest.approx(100 * 2 * (1 / 4) * (1 / 3) / (7 / 12))
    assert set(stemmed) == {*rouge.REPORT_PROTOCOL_NAMES.values(), "per_reference"}


def test_rouge_keys_parse_check_and_match_the_protocols():
    from clustertune.config import parse_config

    assert typing.get_args(HeadlineProtocol) == tuple(rouge.REPORT_PROTOCOL_NAMES.values())
    default = parse_config(EvaluateConfig, [])
    assert default.rouge == RougeSettings(use_stemmer=True, headline=rouge.DEFAULT_HEADLINE)
    cfg = parse_config(EvaluateConfig, ["--rouge.use_stemmer=false", "--rouge.headline=evaluate"])
    assert cfg.rouge == RougeSettings(use_stemmer=False, headline="evaluate")
    with pytest.raises(UserError, match="rouge.headline='median' is not one of"):
        parse_config(EvaluateConfig, ["--rouge.headline=median"])


def test_evaluation_writes_the_chosen_headline_and_stemmer(tmp_path, smoke_assets):
    """One real smoke evaluation (8 examples): rouge.json's top level is protocols.evaluate,
    the stemmer setting is recorded, and predictions.jsonl's scores average to the report."""
    out = tmp_path / "eval"
    result = run(
        launch_command(
            "recipes/evaluate.py",
            [
                "--config",
                "recipes/configs/smoke/evaluate.yaml",
                f"--output_dir={out}",
                "--data.max_examples=8",
                "--num_bootstrap=20",
                "--rouge.use_stemmer=false",
                "--rouge.headline=evaluate",
            ],
        )
    )
    assert result.returncode == 0, describe(result)
    assert "evaluate [95% CI]" in result.stdout and "stemmer off" in result.stdout
    report = json.loads((out / "rouge.json").read_text())
    assert report["headline_protocol"] == "evaluate" and report["use_stemmer"] is False
    assert "Not the use_aggregator=True figure" in report["protocol_descriptions"]["evaluate"]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for metric in rouge.METRICS:
        assert report[metric] == report["protocols"]["evaluate"][metric]
        mean = sum(line["scores"]["evaluate"][metric] for line in lines) / len(lines)
        assert mean == pytest.approx(report[metric], abs=1e-3)
    unstemmed = [
        example_scores(line["prediction"], line["references"], use_stemmer=False) for line in lines
    ]
    assert [line["scores"] for line in lines] == unstemmed
