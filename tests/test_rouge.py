"""Fast unit tests for clustertune.rouge: exact scores, protocols, splitter, bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rouge_score import rouge_scorer

from clustertune.rouge import (
    METRICS,
    aggregate,
    format_table,
    rouge_report,
    score_example,
    split_sentences,
)


def test_identical_strings_score_100_and_disjoint_strings_score_0() -> None:
    text = "#Person1# asks #Person2# for directions. #Person2# points to the station."
    identical = score_example(text, [text])
    disjoint = score_example("alpha beta gamma", ["delta epsilon zeta"])
    for metric in METRICS:
        assert identical["best"][metric] == pytest.approx(100.0)
        assert disjoint["best"][metric] == 0.0


def test_symmetric_pair_computed_by_hand() -> None:
    # All tokens have <= 3 characters, so the Porter stemmer (applied only to longer tokens)
    # changes nothing; the text is lower-case ASCII words, so tokenisation is a plain split.
    # prediction: the cat sat on the mat   (6 tokens)
    # reference:  the cat lay on the mat   (6 tokens)
    # rouge1: overlap = the x min(2,2)=2 + cat + on + mat = 5; P = R = 5/6 -> F = 5/6
    # rouge2: pred bigrams {the cat, cat sat, sat on, on the, the mat} (5),
    #         ref  bigrams {the cat, cat lay, lay on, on the, the mat} (5);
    #         overlap = the cat, on the, the mat = 3; P = R = 3/5 -> F = 3/5
    # rougeL: LCS = the cat on the mat = 5; P = R = 5/6 -> F = 5/6
    scores = score_example("the cat sat on the mat", ["the cat lay on the mat"])["first"]
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rougeLsum"] == pytest.approx(100 * 5 / 6)  # one sentence: same as rougeL


def test_asymmetric_pair_computed_by_hand() -> None:
    # prediction: the cat sat on the mat        (6 tokens)
    # reference:  a cat sat on a mat today      (7 tokens; "today" is stemmed, but it occurs
    #                                            only in the reference, so counts are unchanged)
    # rouge1: overlap = cat, sat, on, mat = 4; P = 4/6, R = 4/7
    #         F = 2PR/(P+R) = 2*(4/6)*(4/7) / (4/6 + 4/7) = (32/42) / (52/42) = 8/13
    # rouge2: pred {the cat, cat sat, sat on, on the, the mat} (5)
    #         ref  {a cat, cat sat, sat on, on a, a mat, mat today} (6)
    #         overlap = cat sat, sat on = 2; P = 2/5, R = 2/6
    #         F = 2*(2/5)*(1/3) / (2/5 + 1/3) = (4/15) / (11/15) = 4/11
    # rougeL: LCS = cat sat on mat = 4, so same P, R, F as rouge1 = 8/13
    scores = score_example("the cat sat on the mat", ["a cat sat on a mat today"])["first"]
    assert scores["rouge1"] == pytest.approx(100 * 8 / 13)
    assert scores["rouge2"] == pytest.approx(100 * 4 / 11)
    assert scores["rougeL"] == pytest.approx(100 * 8 / 13)


def test_tokeniser_lowercases_and_drops_punctuation() -> None:
    # rouge_score lower-cases and maps every non-[a-z0-9] character to a separator.
    scores = score_example("THE CAT, sat!", ["the cat sat"])["best"]
    assert scores["rouge1"] == pytest.approx(100.0)


MULTI_PREDICTION = "#Person1# wants to buy a red coat but it is too expensive."
MULTI_REFERENCES = [
    "#Person2# sells shoes.",
    "#Person1# wants a red coat but finds it too expensive.",
    "#Person1# thinks the coat is too expensive to buy.",
]


def test_multi_reference_protocols() -> None:
    result = score_example(MULTI_PREDICTION, MULTI_REFERENCES)
    per_reference = result["per_reference"]
    assert len(per_reference) == 3
    for metric in METRICS:
        values = [scores[metric] for scores in per_reference]
        assert result["best"][metric] == max(values)
        assert result["mean"][metric] == pytest.approx(np.mean(values))
        assert result["first"][metric] == values[0]
        assert values[result["best_reference_index"][metric]] == max(values)
    # The protocols really differ here, so the example exercises them.
    assert result["first"]["rouge1"] < result["mean"]["rouge1"] < result["best"]["rouge1"]


def test_best_matches_score_multi() -> None:
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    expected = scorer.score_multi(
        [split_sentences(reference) for reference in MULTI_REFERENCES],
        split_sentences(MULTI_PREDICTION),
    )
    result = score_example(MULTI_PREDICTION, MULTI_REFERENCES)
    for metric in METRICS:
        assert result["best"][metric] == pytest.approx(100 * expected[metric].fmeasure)


def test_first_reference_equals_single_reference_score() -> None:
    multi = score_example(MULTI_PREDICTION, MULTI_REFERENCES)
    single = score_example(MULTI_PREDICTION, MULTI_REFERENCES[:1])
    assert multi["first"] == single["best"] == single["mean"] == single["first"]


def test_bad_references_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_example("a prediction", [])
    with pytest.raises(ValueError, match="wrap it"):
        score_example("a prediction", "a bare string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one list of references per prediction"):
        rouge_report(["a", "b"], [["a"]])


def test_split_sentences() -> None:
    assert split_sentences("Hello there. How are you? #Person2# is fine.") == (
        "Hello there.\nHow are you?\n#Person2# is fine."
    )
    assert split_sentences("Mr. Smith paid 3.50 dollars.") == "Mr. Smith paid 3.50 dollars."
    assert split_sentences("Dr. Who came at 5 p.m. Then he left, e.g. Mrs. Lee saw.") == (
        "Dr. Who came at 5 p.m. Then he left, e.g. Mrs. Lee saw."
    )
    # Closing quotes stay with their sentence; lower-case continuation is not a boundary.
    assert split_sentences('He said "Stop!" Then left. it was late.') == (
        'He said "Stop!"\nThen left. it was late.'
    )
    # Existing newlines are boundaries too, and blank lines vanish.
    assert split_sentences("One.\n\nTwo") == "One.\nTwo"


def test_newlines_change_only_rougelsum() -> None:
    # Sentence order swapped: rougeL takes one LCS over the whole text, so it can match only
    # one of the two sentences (4 of 8 tokens -> F = 50); rougeLsum takes a union LCS per
    # reference sentence over all prediction sentences, so it matches both (F = 100).
    prediction = "The dog barked loudly. The cat slept soundly."
    reference = "The cat slept soundly. The dog barked loudly."
    scores = score_example(prediction, [reference])["best"]
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)

    # rouge1/2/L see '\n' as whitespace, so scoring split text for them changes nothing.
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    unsplit = plain.score(reference, prediction)
    for metric in ("rouge1", "rouge2", "rougeL"):
        assert scores[metric] == pytest.approx(100 * unsplit[metric].fmeasure)


def _toy_examples() -> list[dict]:
    predictions = [
        "the cat sat on the mat",
        "#Person1# buys a coat.",
        "they meet at noon. they eat lunch.",
        "nothing in common",
        "#Person2# is late for work again.",
    ]
    references = [
        ["the cat lay on the mat", "a cat sat"],
        ["#Person1# wants to buy a coat.", "#Person2# sells a coat."],
        ["They have lunch at noon."],
        ["a completely different summary"],
        ["#Person2# is late again.", "#Person1# complains that #Person2# is late."],
    ]
    return [score_example(p, r) for p, r in zip(predictions, references, strict=True)]


def test_aggregate_means_equal_numpy_means() -> None:
    examples = _toy_examples()
    summary = aggregate(examples)
    assert summary["num_examples"] == len(examples)
    for protocol in ("best", "mean", "first"):
        for metric in METRICS:
            expected = np.mean([example[protocol][metric] for example in examples])
            assert summary["means"][protocol][metric] == pytest.approx(expected)


def test_bootstrap_is_deterministic_and_contains_the_mean() -> None:
    examples = _toy_examples()
    first = aggregate(examples, num_bootstrap=500, seed=7)
    again = aggregate(examples, num_bootstrap=500, seed=7)
    other_seed = aggregate(examples, num_bootstrap=500, seed=8)
    assert first == again
    assert first["confidence_intervals"] != other_seed["confidence_intervals"]
    for protocol in ("best", "mean", "first"):
        for metric in METRICS:
            low, high = first["confidence_intervals"][protocol][metric]
            assert low <= first["means"][protocol][metric] <= high
            assert low < high  # the toy scores vary, so the interval has width


def test_aggregate_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError):
        aggregate(_toy_examples(), confidence=1.5)
    with pytest.raises(ValueError):
        aggregate(_toy_examples(), num_bootstrap=0)


def test_report_layout_rounding_and_table() -> None:
    report = rouge_report(
        ["the cat sat on the mat", "#Person1# buys a coat."],
        [["the cat lay on the mat", "a cat sat"], ["#Person1# wants to buy a coat."]],
        num_bootstrap=200,
        seed=1,
    )
    json.dumps(report)  # JSON-ready
    assert report["num_examples"] == 2
    assert set(report["protocols"]) == {
        "best_reference",
        "mean_over_references",
        "first_reference",
        "evaluate",
    }
    assert set(report["protocol_descriptions"]) == set(report["protocols"])
    assert report["bootstrap"]["num_bootstrap"] == 200 and report["bootstrap"]["seed"] == 1
    for metric in METRICS:
        assert report[metric] == report["protocols"]["best_reference"][metric]
        assert report[metric] == round(report[metric], 4)
        low, high = report["confidence_intervals"]["best_reference"][metric]
        assert low <= report[metric] <= high
    # Example 1, rouge1: the first reference gives 5/6 (by hand above) and "a cat sat" gives
    # P = 2/6, R = 2/3, F = 4/9, so best-of-references is 5/6.
    first_example_rouge1 = 100 * 5 / 6
    second_example_rouge1 = score_example(
        "#Person1# buys a coat.", ["#Person1# wants to buy a coat."]
    )["best"]["rouge1"]
    assert report["rouge1"] == round((first_example_rouge1 + second_example_rouge1) / 2, 4)

    table = format_table(report)
    assert "best_reference [95% CI]" in table
    for metric in METRICS:
        assert metric in table
    assert f"{report['rouge1']:.2f}" in table
