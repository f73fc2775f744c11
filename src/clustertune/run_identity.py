"""What makes a run the same run: its fingerprint, and the decisions taken from it.

A run's folder holds checkpoints and, once finished, `final/` with FINAL_MARKER. Before any
compute a new launch into that folder is checked against what they record:

- a finished run (FINAL_MARKER) with the same settings and step count has nothing to do;
- a finished run with other settings (`fingerprint`) or another total step count is refused,
  so that its `final/` and `metrics.jsonl` are never replaced by accident;
- a checkpoint made with other settings or for another total step count is refused;

each unless `allow_config_change=true`, which then says in the log what it does. Changing the
total steps (train.max_steps / train.num_epochs) counts as a settings change because the LR
schedule decays to 0 at the total it was built for (checkpoint.py restores only the schedule's
position, so a resume with a new total follows the new schedule).

The optimisation settings (learning rate, its schedule and warmup, weight decay, clipping,
Adam's betas and epsilon) are part of the identity: a resume with other values would continue
a run whose steps so far were taken otherwise, and config.yaml would no longer describe it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from clustertune.config import FinetuneConfig
from clustertune.deepspeed_config import zero_stage
from clustertune.errors import UserError
from clustertune.reshard import other_strategy_message, resume_plan, saved_layout
from clustertune.run_folder import (
    CHECKPOINT_MARKER,
    DEEPSPEED_TAG,
    FSDP_TAG,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    TRAINABLE_FILE,
    TRAINER_STATE,
    RunFolder,
)
from clustertune.sampler import BATCH_PLAN_VERSION

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
    "data.format",
    "data.messages_column",
    "data.tools_column",
    "data.chat_template",
    "data.use_chat_template",
    "data.train_on",
    "data.max_length",
    "data.source_column",
    "data.target_column",
    "data.prompt_template",
    "data.max_source_length",
    "data.max_target_length",
    "data.length_group_size",
    "train.global_batch_size",
    "train.learning_rate",
    "train.lr_schedule",
    "train.warmup_steps",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_epsilon",
)

# Settings that change which parameters are trained (their names and shapes): a checkpoint
# made with other values holds parameters this model does not have, so no resume can use it.
PARAMETER_KEYS = ("peft.method", "peft.r", "peft.target_modules")

# The keys that set the total step count, which the LR schedule is built for. Recorded apart
# from the fingerprint: with num_epochs the total also depends on the data's size.
SCHEDULE_KEYS = ("train.max_steps", "train.num_epochs")

# What evaluation with run_dir takes from a run (the eval key -> the training key), recorded
# in the final marker: evaluation then prompts as final/ was trained, whatever config.yaml says.
# data.chat_template is not among them: final/ saves the tokenizer with the template it trained with.
FINAL_PROMPT_KEYS = {
    "format": "data.format",
    "messages_column": "data.messages_column",
    "tools_column": "data.tools_column",
    "template_date": "data.template_date",
    "use_chat_template": "data.use_chat_template",
    "max_length": "data.max_length",
    "source_column": "data.source_column",
    "prompt_template": "data.prompt_template",
    "max_source_length": "data.max_source_length",
}


def _dotted_get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(value))


def fingerprint(cfg: FinetuneConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of FINGERPRINT_KEYS, and `extra`: what was resolved from them (the chat
    template a run renders with and how its masks are found: chat.ChatTemplate.identity)."""
    # The data order also depends on the batch-plan code: its version is part of the identity.
    return jsonable(
        {
            **{key: _dotted_get(cfg, key) for key in FINGERPRINT_KEYS},
            **_mixture_identity(cfg),
            "batch_plan_version": BATCH_PLAN_VERSION,
            **(extra or {}),
        }
    )


# A mixture source's settings that do not change its training examples.
_MIXTURE_EVAL_KEYS = ("eval_file", "eval_split")


def _mixture_identity(cfg: FinetuneConfig) -> dict[str, Any]:
    """A mixture's sources and weights, one key per setting a source sets
    ("data.mixture[dialogs].weight"), so a change is named as precisely as any other; nothing
    for a run without a mixture (its fingerprint stays as it was)."""
    if not cfg.data.mixture:
        return {}
    identity: dict[str, Any] = {
        "data.mixture_weights": cfg.data.mixture_weights,
        "data.mixture_examples": cfg.data.mixture_examples,
    }
    for source in cfg.data.mixture:
        for key, value in asdict(source).items():
            if value is not None and key not in _MIXTURE_EVAL_KEYS:
                identity[f"data.mixture[{source.label}].{key}"] = value
    return identity


def final_prompt_settings(cfg: FinetuneConfig, template_date: str | None = None) -> dict[str, Any]:
    """The FINAL_PROMPT_KEYS values of this run, for the final marker; `template_date`: the
    date the chat template rendered (data.template_date resolved)."""
    settings = {name: _dotted_get(cfg, key) for name, key in FINAL_PROMPT_KEYS.items()}
    return {**settings, "template_date": template_date or settings["template_date"]}


def schedule_record(cfg: FinetuneConfig) -> dict[str, Any]:
    """The keys behind the total step count, recorded with every checkpoint and final/."""
    return {key: _dotted_get(cfg, key) for key in SCHEDULE_KEYS}


def changed_settings(
    recorded: dict[str, Any],
    cfg: FinetuneConfig,
    total_steps: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} for every setting this launch changes against a checkpoint's
    trainer_state.json or a final marker (which records its total as `step`)."""
    saved, now = recorded.get("fingerprint", {}), fingerprint(cfg, extra)
    changes = {
        key: (saved.get(key), now.get(key))
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    }
    recorded_total = recorded.get("total_steps", recorded.get("step"))
    if recorded_total is not None and recorded_total != total_steps:
        recorded_schedule = recorded.get("schedule", {})
        current_schedule = schedule_record(cfg)
        keys = {
            key: (recorded_schedule[key], current_schedule[key])
            for key in SCHEDULE_KEYS
            if key in recorded_schedule and recorded_schedule[key] != current_schedule[key]
        }
        # Not recorded (a run made before the schedule was), or the same keys over data of
        # another size: name the total and the key it comes from now.
        source = "train.max_steps" if cfg.train.max_steps > 0 else "train.num_epochs"
        changes.update(keys or {f"total steps ({source})": (recorded_total, total_steps)})
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    text = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if "chat.date" in changes and changes["chat.date"][0]:  # the template writes today's date
        text += f" (data.template_date={changes['chat.date'][0]} renders the run's date)"
    return text


class FinishedRun(NamedTuple):
    already_finished: bool  # final/ has these settings and step count: nothing to do
    note: str | None = None  # with allow_config_change=true: what this launch does to final/


def check_finished_run(
    cfg: FinetuneConfig, output_dir: Path, total_steps: int, extra: dict[str, Any] | None = None
) -> FinishedRun:
    """Decide against output_dir/final/ before any compute. A finished run with other settings
    or another step count is refused, naming the keys that differ, unless allow_config_change
    (then the note says what this launch does to it)."""
    marker = RunFolder(output_dir).final_marker
    if cfg.resume == "never" or not marker.is_file():
        return FinishedRun(already_finished=False)
    changes = changed_settings(json.loads(marker.read_text()), cfg, total_steps, extra)
    if not changes:
        return FinishedRun(already_finished=True)
    resume_from = resume_path(cfg, output_dir)
    _refuse_other_parameters(
        resume_from, changes, what=f"output_dir '{output_dir}' holds a finished run that"
    )
    consequence = (
        f"resumes from {resume_from} with the new settings"
        if resume_from is not None
        else "trains from step 0 with the new settings (metrics.jsonl starts over)"
    )
    if resume_from is not None and not set(changes) <= set(fingerprint(cfg, extra)):
        consequence += f" (the LR schedule rebuilt for {total_steps} steps)"
    consequence += " and replaces final/ when it finishes"
    if not cfg.allow_config_change:
        raise UserError(
            f"output_dir '{output_dir}' holds a finished run that was made with other settings "
            f"({describe_changes(changes)}); use a new output_dir, or allow_config_change=true, "
            f"which {consequence}."
        )
    return FinishedRun(
        already_finished=False,
        note=f"allow_config_change=true: the finished run in {output_dir} was made with other "
        f"settings ({describe_changes(changes)}); this launch {consequence}.",
    )


def _refuse_other_parameters(
    checkpoint: Path | None, changes: dict[str, tuple[Any, Any]], *, what: str
) -> None:
    """allow_config_change cannot continue a checkpoint whose trainable parameters differ.
    `what` opens the message: the finished run or the checkpoint that was made otherwise."""
    changed = [key for key in changes if key in PARAMETER_KEYS]
    if checkpoint is None or not changed:
        return
    verb = "changes" if len(changed) == 1 else "change"
    raise UserError(
        f"{what} was made with other settings ({describe_changes(changes)}); "
        f"{', '.join(changed)} {verb} the trainable parameters, so {checkpoint} cannot be "
        "resumed, even with allow_config_change=true; use a new output_dir."
    )


def resume_path(cfg: FinetuneConfig, output_dir: Path) -> Path | None:
    """The checkpoint this launch would continue from, for messages before a launch: the newest
    complete one whose files have their recorded sizes, a given one, or none (the launch itself
    verifies checksums too: checkpoint.choose_resume)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return RunFolder(output_dir).latest_complete()
    return Path(cfg.resume)


# Where each engine keeps the model and optimizer state in a checkpoint folder.
ENGINE_FILES = {
    "deepspeed": [f"{DEEPSPEED_TAG}/"],
    "fsdp2": [f"{FSDP_TAG}/"],
    "ddp": [TRAINABLE_FILE, OPTIMIZER_FILE],
}
ENGINE_NAMES = {
    "deepspeed": "a DeepSpeed (ZeRO) launch",
    "fsdp2": "an FSDP2 launch",
    "ddp": "a DDP or one-process launch",
}


def saved_engine(path: Path) -> str | None:
    """The engine whose files a checkpoint folder holds (None: none of them)."""
    for engine, files in ENGINE_FILES.items():
        if (path / files[0].rstrip("/")).exists():
            return engine
    return None


# Checkpoints one engine continues from another's (engine_moves.py): (saved, this launch's).
ENGINE_MOVES = {("deepspeed", "fsdp2"), ("fsdp2", "deepspeed")}


def missing_checkpoint_files(path: Path, *, engine: str) -> list[str]:
    """What a resume needs from a checkpoint folder and `path` lacks (our own layout,
    checkpoint.Checkpointer.save; DeepSpeed's and DCP's files live in one folder each). A
    checkpoint of an engine this one can continue from needs that engine's files."""
    made_by = saved_engine(path)
    if made_by is not None and (made_by, engine) in ENGINE_MOVES:
        engine = made_by
    needed = [CHECKPOINT_MARKER, TRAINER_STATE, SCHEDULER_FILE, *ENGINE_FILES[engine]]
    return [name for name in needed if not (path / name.rstrip("/")).exists()]


def check_checkpoint_folder(path: Path, *, engine: str) -> None:
    """Refuse a resume folder that is not a whole checkpoint, naming what is missing."""
    if not path.is_dir():
        raise UserError(
            f"resume='{path}' is not a folder; use auto, never, or a checkpoints/step_N path."
        )
    missing = missing_checkpoint_files(path, engine=engine)
    if not missing:
        return
    made_by = saved_engine(path)
    if made_by is not None and made_by != engine:
        if (
            path / CHECKPOINT_MARKER
        ).is_file():  # says which launch files (any world size) can resume it
            raise UserError(other_strategy_message(path, saved_layout(path), ENGINE_NAMES[engine]))
        made_with = ENGINE_NAMES[made_by]
        raise UserError(
            f"the checkpoint in {path} was made by {made_with}; resume it with the launch file "
            "it was made with, or start a new output_dir."
        )
    raise UserError(
        f"the checkpoint in {path} is incomplete: it lacks {', '.join(missing)} (a checkpoint "
        "folder holds trainer_state.json and the model state); resume from another "
        "checkpoints/step_N, or resume=auto for the newest complete one."
    )


def check_resumable(
    path: Path,
    cfg: FinetuneConfig,
    *,
    total_steps: int,
    world_size: int,
    ds_config: dict | None,
    extra: dict[str, Any] | None = None,
    engine: str = "",
) -> str | None:
    """Refuse a checkpoint made with other settings, or by a strategy this launch cannot
    continue, before any weights are loaded; return the log lines that say what changed
    (allow_config_change=true) and how it resumes on another world size (reshard.resume_plan).
    `ds_config` is the launch's DeepSpeed JSON (None without DeepSpeed); `engine` (ddp,
    deepspeed, fsdp2; empty: from ds_config) what shards the model."""
    engine = engine or ("deepspeed" if ds_config is not None else "ddp")
    check_checkpoint_folder(path, engine=engine)
    state = json.loads((path / TRAINER_STATE).read_text())
    changes = changed_settings(state, cfg, total_steps, extra)
    _refuse_other_parameters(path, changes, what=f"the checkpoint in {path}")
    if changes and not cfg.allow_config_change:
        raise UserError(
            f"the checkpoint in {path} was made with different settings "
            f"({describe_changes(changes)}); use a new output_dir, or allow_config_change=true "
            "to resume with the new settings."
        )
    # Another world size: DDP / one-process checkpoints load as they are, ZeRO ones through
    # DeepSpeed's universal checkpoint (reshard.py); another strategy is refused here.
    reshard_note = resume_plan(
        path, world_size=world_size, zero_stage=zero_stage(ds_config), engine=engine
    )
    notes = [reshard_note] if reshard_note else []
    if changes:
        notes.insert(
            0,
            f"allow_config_change=true: resuming {path} with changed settings "
            f"({describe_changes(changes)}).",
        )
    return "\n".join(notes) or None
