"""What makes a run the same run: its fingerprint, and the decisions taken from it.

A run's folder holds checkpoints and, once finished, `final/` with FINAL_MARKER. Before any
compute a new launch into that folder is checked against them: a finished run with the same
settings has nothing to do; a checkpoint made with other settings (model, data, data order,
global batch) is refused unless `allow_config_change=true`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clustertune.checkpoint import TRAINER_STATE, latest_checkpoint
from clustertune.config import FinetuneConfig
from clustertune.errors import UserError
from clustertune.sampler import BATCH_PLAN_VERSION

FINAL_MARKER = "clustertune_final.json"  # in final/: written last, so final/ is complete

# Settings that must not change between a checkpoint and its resume (the data order,
# the model and the meaning of a step depend on them).
FINGERPRINT_KEYS = (
    "seed",
    "model.name_or_path",
    "peft.method",
    "peft.r",
    "peft.alpha",
    "peft.target_modules",
    "data.train_file",
    "data.dataset",
    "data.train_split",
    "data.source_column",
    "data.target_column",
    "data.prompt_template",
    "data.max_source_length",
    "data.max_target_length",
    "data.length_group_size",
    "train.global_batch_size",
)


def _dotted_get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(value))


def fingerprint(cfg: FinetuneConfig) -> dict[str, Any]:
    # The data order also depends on the batch-plan code: its version is part of the identity.
    return jsonable(
        {
            **{key: _dotted_get(cfg, key) for key in FINGERPRINT_KEYS},
            "batch_plan_version": BATCH_PLAN_VERSION,
        }
    )


def already_finished(cfg: FinetuneConfig, output_dir: Path, total_steps: int) -> bool:
    """True when output_dir/final/ was written by a run with these settings and step count."""
    marker = output_dir / "final" / FINAL_MARKER
    if cfg.resume == "never" or not marker.is_file():
        return False
    finished = json.loads(marker.read_text())
    return finished.get("step") == total_steps and finished.get("fingerprint") == fingerprint(cfg)


def resume_path(cfg: FinetuneConfig, output_dir: Path) -> Path | None:
    """The checkpoint this launch continues from: newest complete one, a given one, or none."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(output_dir)
    return Path(cfg.resume)


def check_resumable(
    path: Path, cfg: FinetuneConfig, *, world_size: int, is_deepspeed: bool
) -> None:
    """Refuse a checkpoint made with other settings before any weights are loaded."""
    state = json.loads((path / TRAINER_STATE).read_text())
    saved, now = state["fingerprint"], fingerprint(cfg)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed and not cfg.allow_config_change:
        differences = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise UserError(
            f"the checkpoint in {path} was made with different settings ({differences}); "
            "use a new output_dir, or allow_config_change=true to resume anyway."
        )
    if is_deepspeed and state["world_size"] != world_size:
        raise UserError(
            f"the checkpoint in {path} holds ZeRO partitions for {state['world_size']} ranks, "
            f"this launch has {world_size}; resume with {state['world_size']} processes or "
            "start a new output_dir."
        )
