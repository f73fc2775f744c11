"""Where an evaluation may write its output_dir (config.yaml, predictions.jsonl, rouge.json):

- never into a training run's folder, whose config.yaml is that run's single source of truth,
  nor inside a run's checkpoints/ or final/, which the run prunes or replaces
  (`check_not_in_a_run`);
- over the results of an earlier evaluation only with the same settings (a rerun) or
  overwrite=true (`check_earlier_results`, naming the settings that differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clustertune.errors import UserError
from clustertune.run_folder import (
    CHECKPOINT_MARKER,
    EVAL_DIR,
    FINAL_MARKER,
    EvalFolder,
    evaluation_evidence,
    inside_run_part,
    training_run_evidence,
)

# What a rerun may change without being another evaluation.
_NOT_SETTINGS = {"overwrite", "output_dir"}


def check_not_in_a_run(output_dir: str) -> None:
    folder = Path(output_dir).expanduser()
    evidence = training_run_evidence(folder)
    if evidence:
        # A run's final/ or checkpoints/step_N is replaced or pruned by the run: suggest a
        # folder beside them, in the run's folder.
        run = folder
        if FINAL_MARKER in evidence:
            run = folder.parent
        elif CHECKPOINT_MARKER in evidence:
            run = folder.parent.parent
        raise UserError(
            f"output_dir '{output_dir}' holds a training run's files ({', '.join(evidence)}), "
            "which evaluation would write over; give the evaluation its own folder, e.g. "
            f"--output_dir={run / EVAL_DIR}."
        )
    where = inside_run_part(folder)
    if where is not None:
        raise UserError(
            f"output_dir '{output_dir}' is {where}, which the run prunes or replaces; give "
            f"the evaluation a folder of its own, e.g. the run folder's {EVAL_DIR}/."
        )


def check_earlier_results(output_dir: str, settings: dict[str, Any], *, overwrite: bool) -> None:
    """`settings`: the resolved config of this evaluation, as config.yaml records it."""
    folder = Path(output_dir).expanduser()
    results = evaluation_evidence(folder)
    if not results or overwrite:
        return
    differences = changed_settings(folder, settings)
    if not differences:
        return
    raise UserError(
        f"output_dir '{output_dir}' holds the results of an evaluation made with other "
        f"settings ({differences}; {', '.join(results)}); give a new output_dir, or "
        "overwrite=true to replace them."
    )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {
            k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: node}


def changed_settings(folder: Path, settings: dict[str, Any]) -> str:
    """The settings that differ between folder's config.yaml and `settings`, as
    "key: old -> new; ..." (empty: the same); what is missing where none records them."""
    config_file = EvalFolder(folder).config
    try:
        recorded = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"no readable {config_file.name} records them"
    old, new = _flat(recorded), _flat(settings)
    keys = sorted(
        k for k in set(old) | set(new) if k not in _NOT_SETTINGS and old.get(k) != new.get(k)
    )
    return "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys)
