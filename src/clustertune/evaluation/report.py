"""What an evaluation writes: per-example scores (predictions.jsonl) and the report (rouge.json).

- `example_scores`: one example's ROUGE under the report's protocol names (best reference,
  mean over references, first reference, evaluate) and per reference, rounded for
  predictions.jsonl (what `--compare`'s paired bootstrap reads).
- `build_report`: rouge.json: `rouge.rouge_report` (scores, protocols, bootstrap intervals,
  headline protocol, stemmer setting) plus what was evaluated (model, dataset, generation
  settings), throughput and auto_batch.
- `prediction_lines`, `write_outputs`: predictions.jsonl and rouge.json, written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clustertune import rouge
from clustertune.atomicio import write_text_atomic
from clustertune.autobatch import SearchResult
from clustertune.chat import replies
from clustertune.evaluation.config import EvaluateConfig
from clustertune.evaluation.evalset import EvalSet
from clustertune.run_folder import EvalFolder


def _rounded(scores: Mapping[str, float]) -> dict[str, float]:
    return {metric: round(value, 4) for metric, value in scores.items()}


def example_scores(
    prediction: str, references: list[str], *, use_stemmer: bool = True
) -> dict[str, Any]:
    """Per-example ROUGE for predictions.jsonl, under the report's protocol names."""
    scores = rouge.score_example(prediction, references, use_stemmer=use_stemmer)
    return {
        **{rouge.REPORT_PROTOCOL_NAMES[p]: _rounded(scores[p]) for p in rouge.PROTOCOLS},
        "per_reference": [_rounded(s) for s in scores["per_reference"]],
    }


def tool_call_scores(
    eval_set: EvalSet, replies_: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """Over the examples whose reference reply calls tools: the share whose generated reply
    makes exactly those calls (names and parsed arguments, any order), and the share with the
    right function names. None when no reference calls a tool."""
    examples = eval_set.examples or []
    matches = [
        replies.calls_match(reply.get("tool_calls"), example.reference_calls)
        for example, reply in zip(examples, replies_, strict=True)
        if example.reference_calls
    ]
    if not matches:
        return None
    return {
        "examples": len(matches),
        "exact_match": round(100 * sum(exact for exact, _ in matches) / len(matches), 2),
        "name_match": round(100 * sum(names for _, names in matches) / len(matches), 2),
        "scored_as": "percent of examples whose reference reply calls tools; exact: the same "
        "function names and parsed arguments, in any order",
    }


def build_report(
    cfg: EvaluateConfig,
    eval_set: EvalSet,
    predictions: Sequence[str],
    *,
    replies_: Sequence[Mapping[str, Any]] = (),
    kind: str,
    dtype: str,
    throughput: dict[str, Any],
    auto_batch: SearchResult | None,
    stop_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The content of rouge.json: scores with bootstrap intervals, then what produced them."""
    report = rouge.rouge_report(
        predictions,
        eval_set.references,
        use_stemmer=cfg.rouge.use_stemmer,
        headline=cfg.rouge.headline,
        num_bootstrap=cfg.num_bootstrap,
        seed=cfg.seed,
    )
    report["model"] = {
        "name_or_path": cfg.model.name_or_path,
        "adapter_path": cfg.model.adapter_path,
        "run_dir": cfg.run_dir,
        "kind": kind,
        "dtype": dtype,
    }
    data, style = cfg.data, eval_set.style
    is_chat = style.format == "chat"
    report["dataset"] = {
        "source": data.eval_file or data.dataset,
        "split": None if data.eval_file else data.split,
        "num_examples": len(eval_set.ids),
        "max_examples": data.max_examples,
        "ids": eval_set.id_source,
        "format": style.format,
        # null with chat data: each conversation's last assistant turn is its reference
        "reference_columns": None
        if data.reference_columns is None
        else list(data.reference_columns),
        "prompts": style.describe(),
        **(
            {
                "messages_column": data.messages_column,
                "tools_column": data.tools_column,
                "max_length": data.max_length,
            }
            if is_chat
            else {
                "source_column": data.source_column,
                "prompt_template": data.prompt_template,
                "max_source_length": data.max_source_length,
                "prompts_truncated": eval_set.num_truncated,
            }
        ),
        # the template's own setting: empty keeps the tokenizer's (with run_dir, final/'s)
        **(
            {"chat_template": style.template.origin, "template_mask": style.template.mask}
            if style.template is not None
            else {}
        ),
    }
    if is_chat and replies_:
        calls = tool_call_scores(eval_set, replies_)
        if calls is not None:
            report["tool_calls"] = calls
    report["generation"] = {**asdict(cfg.generation), "stop_token_ids": list(stop_ids)}
    report["throughput"] = throughput
    if auto_batch is not None:
        report["auto_batch"] = auto_batch.to_json()
    return report


def prediction_lines(
    eval_set: EvalSet,
    predictions: Sequence[str],
    replies_: Sequence[Mapping[str, Any]] = (),
    *,
    use_stemmer: bool = True,
) -> list[str]:
    """One JSON line per example, in eval-set order: id, prompt, prediction, references, scores;
    for chat sets also the parsed reply and, where the reference calls tools, whether the
    generated calls match."""
    lines = []
    examples = eval_set.examples or [None] * len(eval_set.ids)
    parsed = list(replies_) or [None] * len(eval_set.ids)
    for example_id, prompt, prediction, references, example, reply in zip(
        eval_set.ids,
        eval_set.prompts,
        predictions,
        eval_set.references,
        examples,
        parsed,
        strict=True,
    ):
        line: dict[str, Any] = {
            "id": example_id,
            "prompt": prompt,
            "prediction": prediction,
            "references": references,
            "scores": example_scores(prediction, references, use_stemmer=use_stemmer),
        }
        if reply is not None:
            line["reply"] = reply
        if example is not None and example.reference_calls and reply is not None:
            exact, names = replies.calls_match(reply.get("tool_calls"), example.reference_calls)
            line["tool_calls"] = {"exact_match": exact, "name_match": names}
        lines.append(json.dumps(line))
    return lines


def write_outputs(
    output_dir: Path,
    report: Mapping[str, Any],
    eval_set: EvalSet,
    predictions: Sequence[str],
    replies_: Sequence[Mapping[str, Any]] = (),
) -> None:
    """predictions.jsonl, then rouge.json, each atomically. The per-example scores use the
    report's stemmer setting, so they average to its means."""
    lines = prediction_lines(
        eval_set, predictions, replies_, use_stemmer=report.get("use_stemmer", True)
    )
    folder = EvalFolder(output_dir)
    write_text_atomic(folder.predictions, "\n".join(lines) + "\n")
    write_text_atomic(folder.rouge, json.dumps(report, indent=2) + "\n")
