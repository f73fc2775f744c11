"""The run folder: its layout, its markers, and the questions every other module asks about it.

    <output_dir>/                          a training run
      config.yaml                          the resolved config (written once every check passed)
      metrics.jsonl, training_curves.png
      auto_batch.json, auto_batch_tokens.json     the batch-size search caches (autobatch.py)
      checkpoints/step_N/                  a checkpoint; complete once COMPLETE.json is in it
        COMPLETE.json                      step, world size, ZeRO stage, and every other file of
                                           the folder with its size and CRC-32
        trainer_state.json, scheduler.pt, rng_rank<R>.pt
        trainable_parameters.safetensors, optimizer.pt     (DDP, one process)
        engine/                            (DeepSpeed's own files, tag "engine")
        universal/, .universal.lock, .universal.tmp-*      (reshard.py, made on first need)
      checkpoints/.tmp-step_N/             being written: never read, removed by the next save
      final/                               the model; clustertune_final.json is written last
      .final.tmp/, .final.old/             while final/ is written or replaced (export.py)
      eval/                                its evaluation, by convention (an evaluation folder)

    <output_dir>/                          an evaluation
      config.yaml, predictions.jsonl, rouge.json, auto_batch.json
      <name>/ ...                          one per adapter of a multi-adapter job
      comparison.md, comparison.png        (also the whole of a --compare --out folder)

The questions: which checkpoints are complete (`RunFolder.complete_checkpoints`), whether one
verifies against its marker (`checkpoint_damage`), which is the newest usable one
(`newest_verified`), what marks a folder as a training run's or an evaluation's
(`training_run_evidence`, `evaluation_evidence`), and whether a path lies inside a part of a
run that the run itself replaces or prunes (`inside_run_part`). Removing a checkpoint removes
only what clustertune wrote into it (`remove_checkpoint`). The space and permission checks
before compute are clustertune.storage.

Integrity: COMPLETE.json lists every file with its size and CRC-32 (zlib.crc32, streamed in
8 MiB reads). It catches truncation (the size) and damage in place (the checksum); it is not
a defence against deliberate tampering. Cost: benchmarks/checkpoint_checksum.py (~0.2 s per
GB read from the page cache on one core; a cold read is bounded by the disk).
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.atomicio import write_json_atomic

# ------------------------------------------------------------------ names of the layout
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
AUTO_BATCH_FILE = "auto_batch.json"
AUTO_BATCH_TOKENS_FILE = "auto_batch_tokens.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
EVAL_DIR = "eval"  # a run's own evaluation, by convention (clustertune-submit --then evaluate)
FINAL_TMP_DIR = ".final.tmp"
FINAL_MARKER = "clustertune_final.json"  # in final/: written last, so final/ is complete
CHECKPOINT_MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
TRAINABLE_FILE = "trainable_parameters.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_TAG = "engine"  # DeepSpeed's checkpoint tag: its files live in step_N/engine/
FSDP_TAG = "dcp"  # FSDP2: torch.distributed.checkpoint's shards live in step_N/dcp/
UNIVERSAL_DIR = "universal"
UNIVERSAL_MARKER = "UNIVERSAL.json"  # inside universal/, written before its rename
UNIVERSAL_LOCK = ".universal.lock"
UNIVERSAL_TMP_PREFIX = ".universal.tmp-"
PREDICTIONS_FILE = "predictions.jsonl"
ROUGE_FILE = "rouge.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
WRITE_PROBE_PREFIX = ".write-probe-"

_STEP = re.compile(r"step_(\d+)")
_TMP_STEP = re.compile(r"\.tmp-step_(\d+)")
# What DeepSpeed's save_checkpoint puts beside its tag folder (the `latest` tag file and a
# copy of its recovery scripts).
_DEEPSPEED_EXTRAS = ("latest", "zero_to_fp32.py", "zero_to_torch.py")
CHUNK_BYTES = 8 << 20  # checksum reads: large enough that the per-call cost vanishes


def rng_file_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step}"


def checkpoint_step(path: Path) -> int | None:
    """N for a step_N folder name, else None."""
    match = _STEP.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


# Top-level files that only a training config.yaml has (an evaluation config.yaml has none).
_TRAINING_ONLY_KEYS = {"train", "peft", "checkpoint", "resume", "allow_config_change"}


@dataclass(frozen=True)
class RunFolder:
    """The paths of one training run's folder (evaluation outputs: `EvalFolder`)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def curves(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def final_tmp(self) -> Path:
        return self.root / FINAL_TMP_DIR

    @property
    def final_marker(self) -> Path:
        return self.final / FINAL_MARKER

    def auto_batch_cache(self, tokens: bool = False) -> Path:
        return self.root / (AUTO_BATCH_TOKENS_FILE if tokens else AUTO_BATCH_FILE)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_tmp(self, step: int) -> Path:
        return self.checkpoints / f".tmp-{checkpoint_name(step)}"

    def stale_checkpoint_tmps(self) -> list[Path]:
        """.tmp-step_N folders: left by a kill or a failed write during a save."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if _TMP_STEP.fullmatch(p.name))

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """step_N folders holding the marker, oldest first (whether they verify: see
        `checkpoint_damage`). A folder without the marker is never used."""
        found = []
        if self.checkpoints.is_dir():
            for path in self.checkpoints.iterdir():
                step = checkpoint_step(path)
                if step is not None and (path / CHECKPOINT_MARKER).is_file():
                    found.append((step, path))
        return sorted(found)

    def latest_complete(self) -> Path | None:
        """The newest checkpoint with a marker whose files have the recorded sizes (no
        checksums read: for messages and plans before a launch; a resume verifies fully)."""
        for _, path in reversed(self.complete_checkpoints()):
            if checkpoint_damage(path, checksums=False) is None:
                return path
        return None

    def is_finished(self) -> bool:
        return self.final_marker.is_file()


@dataclass(frozen=True)
class EvalFolder:
    """The paths of one evaluation's output folder (or one system's, with adapter_paths)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS_FILE

    @property
    def rouge(self) -> Path:
        return self.root / ROUGE_FILE

    @property
    def auto_batch_cache(self) -> Path:
        return self.root / AUTO_BATCH_FILE

    @property
    def comparison_md(self) -> Path:
        return self.root / COMPARISON_MD

    @property
    def comparison_png(self) -> Path:
        return self.root / COMPARISON_PNG


# ------------------------------------------------------------------ integrity
def crc32_of(path: Path) -> str:
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _is_conversion_entry(name: str) -> bool:
    """The universal form and its lock / temp folders: made after the checkpoint is complete."""
    return name in (UNIVERSAL_DIR, UNIVERSAL_LOCK) or name.startswith(UNIVERSAL_TMP_PREFIX)


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its marker and the universal cache, as relative
    POSIX paths, sorted."""
    names = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or _is_conversion_entry(relative.parts[0]):
            continue
        if relative.as_posix() != CHECKPOINT_MARKER:
            names.append(relative.as_posix())
    return names


def write_checkpoint_marker(
    folder: Path, *, step: int, world_size: int, zero_stage: int, engine: str = ""
) -> None:
    """COMPLETE.json, written last: the checkpoint is whole and these are its files. `engine`
    (ddp, deepspeed, fsdp2) says which layout the model and optimizer state are in."""
    files = {
        name: {"size": (folder / name).stat().st_size, "crc32": crc32_of(folder / name)}
        for name in checkpoint_files(folder)
    }
    engine = engine or ("deepspeed" if zero_stage else "ddp")
    marker = {
        "step": step,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "engine": engine,
        "files": files,
    }
    write_json_atomic(folder / CHECKPOINT_MARKER, marker)


def read_checkpoint_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CHECKPOINT_MARKER).read_text())


def checkpoint_damage(folder: Path, *, checksums: bool = True) -> str | None:
    """None when every file COMPLETE.json lists is there with its size (and, with checksums,
    its CRC-32); else what is wrong, naming the first damaged file."""
    if not (folder / CHECKPOINT_MARKER).is_file():
        return f"it has no {CHECKPOINT_MARKER}"
    try:
        files = read_checkpoint_marker(folder).get("files")
    except (OSError, ValueError, AttributeError):
        return f"its {CHECKPOINT_MARKER} cannot be read"
    if not isinstance(files, dict) or not files:
        return f"its {CHECKPOINT_MARKER} lists no files"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size:,} bytes, {CHECKPOINT_MARKER} records {record.get('size'):,}"
    if checksums:
        for name, record in files.items():
            if crc32_of(folder / name) != record.get("crc32"):
                return f"{name} does not match the CRC-32 {CHECKPOINT_MARKER} records"
    return None


@dataclass(frozen=True)
class ResumeChoice:
    path: Path | None  # the newest checkpoint that verifies; None: none does (or none exists)
    damaged: tuple[tuple[Path, str], ...]  # newer checkpoints that did not verify, and why

    def warning(self) -> str | None:
        """One line naming each damaged checkpoint, its damaged file and what is used instead."""
        if not self.damaged or self.path is None:
            return None
        which = "; ".join(f"{path} ({why})" for path, why in self.damaged)
        return (
            f"clustertune: warning: damaged checkpoint skipped: {which}; resuming from {self.path}."
        )

    def none_left(self) -> str:
        """The refusal when every checkpoint is damaged."""
        which = "; ".join(f"{path.name}: {why}" for path, why in self.damaged)
        folder = self.damaged[0][0].parent
        return (
            f"every checkpoint in {folder} is damaged ({which}), so none can be resumed; move "
            f"{folder} aside to train from step 0, or use a new output_dir."
        )


def newest_verified(run: RunFolder) -> ResumeChoice:
    """The newest complete checkpoint whose files verify (sizes and checksums)."""
    damaged = []
    for _, path in reversed(run.complete_checkpoints()):
        problem = checkpoint_damage(path)
        if problem is None:
            return ResumeChoice(path, tuple(damaged))
        damaged.append((path, problem))
    return ResumeChoice(None, tuple(damaged))


# ------------------------------------------------------------------ removing what is ours
def _ours_without_marker(entry: Path) -> bool:
    """An entry of a checkpoint folder that clustertune (or DeepSpeed, for it) writes."""
    name = entry.name
    return (
        name
        in (
            CHECKPOINT_MARKER,
            TRAINER_STATE,
            SCHEDULER_FILE,
            TRAINABLE_FILE,
            OPTIMIZER_FILE,
            DEEPSPEED_TAG,
            FSDP_TAG,
            *_DEEPSPEED_EXTRAS,
        )
        or re.fullmatch(r"rng_rank\d+\.pt", name) is not None
        or _is_conversion_entry(name)
    )


def foreign_entries(folder: Path) -> list[str]:
    """What a checkpoint folder holds that clustertune did not write into it: with a marker,
    anything it does not list (but the universal cache); without, anything of another name."""
    try:
        listed = set(read_checkpoint_marker(folder).get("files") or {})
    except (OSError, ValueError, AttributeError):
        listed = None
    if listed is None:
        return sorted(e.name for e in folder.iterdir() if not _ours_without_marker(e))
    foreign = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if _is_conversion_entry(relative.parts[0]) or relative.as_posix() == CHECKPOINT_MARKER:
            continue
        if path.is_file() and relative.as_posix() not in listed:
            foreign.append(relative.as_posix())
    return foreign


def remove_checkpoint(folder: Path) -> list[str]:
    """Remove what clustertune wrote into a checkpoint folder, and the folder once empty.
    Returns what was left because clustertune did not write it (then the folder stays)."""
    foreign = foreign_entries(folder)
    if not foreign:
        shutil.rmtree(folder)
        return []
    keep = {Path(name).parts[0] for name in foreign}
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return foreign


# ------------------------------------------------------------------ what a folder holds
def training_run_evidence(folder: Path) -> list[str]:
    """The files that mark `folder` as a training run's, or its final/ or one of its
    checkpoints (empty: none). A config.yaml counts when it has training-only keys."""
    found = [
        name
        for name in (
            f"{FINAL_DIR}/",
            f"{CHECKPOINTS_DIR}/",
            METRICS_FILE,
            FINAL_MARKER,
            CHECKPOINT_MARKER,
        )
        if (folder / name.rstrip("/")).exists()
    ]
    if _config_keys(folder / CONFIG_FILE) & _TRAINING_ONLY_KEYS:
        found.insert(0, CONFIG_FILE)
    return found


def evaluation_evidence(folder: Path) -> list[str]:
    """The results that mark `folder` as an evaluation's (empty: none): its own, or those of
    the systems of a multi-adapter job, one folder down."""
    found = [name for name in (ROUGE_FILE, PREDICTIONS_FILE) if (folder / name).is_file()]
    if folder.is_dir():
        found += sorted(
            f"{system.name}/{ROUGE_FILE}"
            for system in folder.iterdir()
            if system.is_dir() and (system / ROUGE_FILE).is_file()
        )
    return found


def _config_keys(config_file: Path) -> set[str]:
    import yaml

    if not config_file.is_file():
        return set()
    try:
        mapping = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return set(mapping) if isinstance(mapping, dict) else set()


def inside_run_part(path: Path) -> str | None:
    """Where `path` (which need not exist) lies inside a part of a training run that the run
    writes, replaces or prunes: a checkpoint, the run's checkpoints/ or final/. None: nowhere."""
    path = Path(path).expanduser().resolve()
    for folder in (path, *path.parents):
        if (folder / CHECKPOINT_MARKER).is_file() or (
            checkpoint_step(folder) is not None and folder.parent.name == CHECKPOINTS_DIR
        ):
            return f"inside the checkpoint {folder}"
        if folder.name in (CHECKPOINTS_DIR, FINAL_DIR) and _holds_run(folder):
            return f"inside {folder}, the {folder.name}/ of the training run {folder.parent}"
    return None


def _holds_run(part: Path) -> bool:
    """Whether `part` (a folder named checkpoints or final) belongs to a training run: it holds
    a checkpoint or the final marker, or its parent has a run's other files."""
    if (part / FINAL_MARKER).is_file():
        return True
    if part.is_dir() and any(
        checkpoint_step(child) is not None or _TMP_STEP.fullmatch(child.name)
        for child in part.iterdir()
    ):
        return True
    others = set(training_run_evidence(part.parent)) - {f"{part.name}/"}
    return bool(others)
