"""Resuming a ZeRO checkpoint on another world size, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's slice of the flat fp32 master weights and Adam moments, cut
for the world size that wrote it (2 ranks: zero_pp_rank_0/1_..._optim_states.pt, each half of
every flat group). DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) rewrites them as
one file per parameter and state, zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt, and an engine
built with `"checkpoint": {"load_universal": true}` cuts those again for its own world size.
Nothing here reads or writes DeepSpeed's file formats; this module decides when to convert,
converts once, and makes the conversion safe:

    checkpoints/step_N/engine/                 the ZeRO checkpoint (DeepSpeed tag "engine")
    checkpoints/step_N/universal/engine/       its universal form, made on first need
    checkpoints/step_N/universal/UNIVERSAL.json  written last inside it: source shape, size, time
    checkpoints/step_N/.universal.lock         held while converting (flock)

- Once: the cache is reused by every later launch on any world size (2 -> 1 -> 4 converts once).
- Atomic: the converter writes into step_N/.universal.tmp-<host>-<pid>/, which is renamed to
  universal/ only when complete. A kill at any moment leaves step_N/engine/ untouched (resume
  on the old shape works as before) and at most a .universal.tmp-* folder, which the next
  conversion removes; a universal/ folder is never half-written.
- One converter: only the global main process converts (the other ranks, on this node or
  others, wait for it at an all-reduce), under an exclusive flock on .universal.lock, so two jobs
  resuming the same output_dir convert it once; the second finds universal/ and uses it.
  Where the filesystem refuses flock (some Lustre mounts), the rename alone still decides:
  renaming onto an existing universal/ fails, and the loser discards its own copy.

Which changes can resume (`resume_plan`): DDP and single-process checkpoints hold the whole
state in one file and resume on any world size as they are; ZeRO-1/2 checkpoints resume under
ZeRO-1 or 2 (their universal form is the same), ZeRO-3 (with or without offload) under ZeRO-3;
anything else is refused with one line that says what is possible.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import io
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.atomicio import fsync_dir, write_json_atomic
from clustertune.errors import UserError
from clustertune.run_folder import (
    DEEPSPEED_TAG,
    UNIVERSAL_DIR,
    UNIVERSAL_LOCK,
    UNIVERSAL_MARKER,
    UNIVERSAL_TMP_PREFIX,
    read_checkpoint_marker,
)

CRASH_ENV = "CLUSTERTUNE_TEST_CRASH_IN_CONVERSION"  # test-only: "1" dies before the rename
VISIBLE_TIMEOUT_S = 120.0  # other nodes: how long to wait for universal/ to show up (NFS caches)


# ----------------------------------------------------------------------------- what a folder holds
@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint was made: its world size, ZeRO stage and engine."""

    world_size: int
    # 0: no DeepSpeed (DDP, one process or FSDP2); None: ZeRO-1 or 2, made before the stage
    # was recorded
    zero_stage: int | None
    engine: str = ""  # ddp | deepspeed | fsdp2; empty: from zero_stage

    @property
    def is_deepspeed(self) -> bool:
        return self.zero_stage != 0

    @property
    def is_fsdp(self) -> bool:
        return self.engine == "fsdp2"

    @property
    def label(self) -> str:
        return strategy_name(self.zero_stage, self.world_size, self.engine)


def strategy_name(zero_stage: int | None, world_size: int, engine: str = "") -> str:
    if engine == "fsdp2":
        return "FSDP2"
    if zero_stage is None:
        return "ZeRO-1/2"
    if zero_stage:
        return f"ZeRO-{zero_stage}"
    return "DDP" if world_size > 1 else "one process"


def saved_layout(checkpoint: Path) -> SavedLayout:
    """From COMPLETE.json (which records zero_stage since resharding exists), else the files:
    ZeRO-3 names its model states per rank (zero_pp_rank_R_mp_rank_00_model_states.pt),
    ZeRO-1/2 writes one mp_rank_00_model_states.pt."""
    marker = read_checkpoint_marker(checkpoint)
    if "zero_stage" in marker:
        return SavedLayout(marker["world_size"], marker["zero_stage"], marker.get("engine", ""))
    engine = checkpoint / DEEPSPEED_TAG
    if not engine.is_dir():
        return SavedLayout(marker["world_size"], 0)
    stage3 = any(engine.glob("*zero_pp_rank_*_model_states.pt"))
    return SavedLayout(marker["world_size"], 3 if stage3 else None)


def _family(zero_stage: int | None, engine: str = "") -> str:
    """Stages whose universal checkpoints load into each other (DeepSpeed writes ZeRO-1 and 2
    through one optimizer class; ZeRO-3's optimizer_state.pt has another layout); FSDP2's
    DCP checkpoints load into FSDP2 on any world size."""
    if engine == "fsdp2":
        return "fsdp2"
    return {0: "none", 3: "zero3"}.get(zero_stage, "zero12")  # type: ignore[arg-type]


def resume_plan(
    checkpoint: Path, *, world_size: int, zero_stage: int, engine: str = ""
) -> str | None:
    """How this launch (world_size ranks, ZeRO stage zero_stage, 0 without DeepSpeed; engine
    fsdp2 for FSDP2) resumes `checkpoint`: None when the saved state loads as it is, a note
    when it is resharded, or a UserError with what is possible."""
    saved = saved_layout(checkpoint)
    now = strategy_name(zero_stage, world_size, engine)
    if engine == "fsdp2" and saved.is_deepspeed:
        return (
            f"{checkpoint} was saved by {saved.label} on {saved.world_size} rank(s), this launch "
            f"is FSDP2 on {world_size}: its weights and Adam moments are read from DeepSpeed's "
            f"universal form of it (converted once into {checkpoint / UNIVERSAL_DIR})."
        )
    if saved.is_fsdp and zero_stage == 3:
        raise UserError(
            f"the checkpoint in {checkpoint} was made by FSDP2 on {saved.world_size} rank(s) and "
            "cannot continue under ZeRO-3 (DeepSpeed's universal form for ZeRO-3 is written only "
            "from a ZeRO-3 engine's own optimizer state); resume it with launch/fsdp2.yaml, "
            "launch/fsdp2_offload.yaml, launch/zero1.yaml or launch/zero2.yaml (any number of "
            f"processes), or write its weights out with `clustertune-checkpoint consolidate "
            f"{checkpoint} DEST`."
        )
    if saved.is_fsdp and zero_stage != 0:
        return (
            f"{checkpoint} was saved by FSDP2 on {saved.world_size} rank(s), this launch is {now} "
            f"on {world_size}: its weights and Adam moments are written as DeepSpeed's universal "
            "form, which the engine loads."
        )
    if _family(saved.zero_stage, saved.engine) != _family(zero_stage, engine):
        raise UserError(other_strategy_message(checkpoint, saved, now))
    if saved.is_fsdp:
        if saved.world_size == world_size:
            return None
        return (
            f"{checkpoint} was saved by FSDP2 on {saved.world_size} rank(s), this launch has "
            f"{world_size}: torch.distributed.checkpoint reshards it as it loads."
        )
    if not saved.is_deepspeed:
        if saved.world_size == world_size:
            return None
        return (
            f"resuming {checkpoint} ({saved.label} on {saved.world_size} rank(s)) on {world_size}: "
            "it holds the whole model and optimizer state, so it loads as it is."
        )
    if not needs_universal(checkpoint, world_size=world_size, zero_stage=zero_stage):
        return None
    how = (
        f"will reshard from {saved.world_size} to {world_size} ranks"
        if saved.world_size != world_size
        else f"will load it as {now}"
    )
    return (
        f"{checkpoint} was saved by {saved.label} on {saved.world_size} rank(s), this launch is "
        f"{now} on {world_size}: {how} (DeepSpeed universal checkpoint, converted once into "
        f"{checkpoint / UNIVERSAL_DIR})."
    )


def other_strategy_message(checkpoint: Path, saved: SavedLayout, now: str) -> str:
    """One line: `checkpoint` cannot continue under `now`, and which launch files can."""
    what = f"the checkpoint in {checkpoint} was made by {saved.label} on {saved.world_size} rank(s)"
    if saved.is_fsdp:
        possible = (
            "launch/fsdp2.yaml, launch/fsdp2_offload.yaml, launch/zero1.yaml or "
            "launch/zero2.yaml (any number of processes)"
        )
    elif not saved.is_deepspeed:
        possible = "launch/ddp.yaml or launch/single_gpu.yaml (any number of processes)"
    elif _family(saved.zero_stage) == "zero3":
        possible = (
            "launch/zero3.yaml, launch/zero3_offload.yaml or launch/fsdp2.yaml (any number of "
            "processes)"
        )
    else:
        possible = (
            "launch/zero1.yaml, launch/zero2.yaml or launch/fsdp2.yaml (any number of processes)"
        )
    export = (
        f", or write its weights out with `clustertune-checkpoint consolidate {checkpoint} "
        "DEST` (weights only: the Adam moments do not carry over)"
        if saved.is_deepspeed or saved.is_fsdp
        else ""
    )
    return (
        f"{what} and cannot continue under {now} (its optimizer state is laid out for "
        f"{saved.label}); resume it with {possible}{export}."
    )


def reshard_note(saved_world_size: int, world_size: int) -> str:
    """The opening of the resume log line's parenthesis: "resharded from 2 to 1 ranks, "."""
    if saved_world_size == world_size:
        return ""
    return f"resharded from {saved_world_size} to {world_size} ranks, "


def needs_universal(
    checkpoint: Path, *, world_size: int, zero_stage: int, fsdp: bool = False
) -> bool:
    """Whether resuming `checkpoint` goes through DeepSpeed's universal form: always between
    ZeRO and FSDP2 (either way); between ZeRO launches, for another world size or the other one
    of ZeRO-1/2 (an older checkpoint that did not record its stage loads as it did before, on
    its own world size). `fsdp`: this launch is FSDP2."""
    saved = saved_layout(checkpoint)
    if fsdp:
        return saved.is_deepspeed
    if saved.is_fsdp:
        return zero_stage != 0
    other_stage = saved.zero_stage is not None and saved.zero_stage != zero_stage
    return (
        saved.is_deepspeed and zero_stage != 0 and (saved.world_size != world_size or other_stage)
    )


def universal_load_config(
    ds_config: dict | None, resume_from: Path | None, world_size: int
) -> dict | None:
    """The DeepSpeed JSON for this launch: with "checkpoint": {"load_universal": true} when the
    checkpoint it resumes must be resharded (DeepSpeed reads the switch when the engine is
    built, so it is set before the Accelerator exists)."""
    if ds_config is None or resume_from is None:
        return ds_config
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if not needs_universal(resume_from, world_size=world_size, zero_stage=stage):
        return ds_config
    config = copy.deepcopy(ds_config)
    config.setdefault("checkpoint", {})["load_universal"] = True
    return config


# ----------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class Conversion:
    folder: Path  # the universal checkpoint: load_checkpoint(folder, tag="engine")
    seconds: float  # 0 when it was already there
    size_bytes: int
    converted_now: bool


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[bool]:
    """An exclusive flock for the block; yields False where the filesystem has none."""
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # e.g. Lustre mounted without flock: the rename still decides
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def universal_info() -> dict[str, Any]:
    """The client state DeepSpeed's universal-checkpoint converter asks for ("Required
    universal_checkpoint_info state is missing in checkpoint. Verify that client creates this
    state."). Without tensor or pipeline parallelism it is only the format version; the
    parameter patterns it can also hold describe tensor-parallel slices, which we do not have."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }


def run_deepspeed_converter(engine_dir: Path, output_engine_dir: Path, workers: int) -> None:
    """deepspeed.checkpoint.ds_to_universal, in this process. Its arguments are those of its
    command line; inject_missing_state adds the universal_checkpoint_info that DeepSpeed asks
    the client to save (checkpoint.py saves it; checkpoints made before that lack it, and it
    holds only the format version for a model without tensor or pipeline parallelism).
    workers > 1 forks a process pool: only for a process without a process group (the CLI)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(engine_dir),
        output_folder=str(output_engine_dir),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    captured = io.StringIO()  # it prints every step and a tqdm bar per pass
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            ds_to_universal.main(args)
    except Exception as error:
        tail = "\n".join(captured.getvalue().splitlines()[-20:])
        raise RuntimeError(
            f"DeepSpeed's ds_to_universal failed on {engine_dir}: {error!r}\n{tail}"
        ) from error


def convert_to_universal(
    checkpoint: Path,
    dest: Path | None = None,
    *,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> Conversion:
    """The universal form of `checkpoint` (a checkpoints/step_N folder) in `dest` (default: its
    universal/ cache), made once, atomically; see the module docstring."""
    dest = Path(dest) if dest is not None else checkpoint / UNIVERSAL_DIR
    marker = dest / UNIVERSAL_MARKER
    if marker.is_file():
        return Conversion(dest, 0.0, folder_size(dest), converted_now=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_file = dest.parent / (
        UNIVERSAL_LOCK if dest.name == UNIVERSAL_DIR else f".{dest.name}.lock"
    )
    prefix = UNIVERSAL_TMP_PREFIX if dest.name == UNIVERSAL_DIR else f".{dest.name}.tmp-"
    with _exclusive(lock_file) as locked:
        if marker.is_file():  # another job converted it while we waited for the lock
            return Conversion(dest, 0.0, folder_size(dest), converted_now=False)
        if locked:  # nobody else converts now: what is left was killed mid-conversion
            for stale in dest.parent.glob(f"{prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
            if dest.exists():  # no marker: not ours to trust (a copy interrupted by hand)
                shutil.rmtree(dest)
        tmp = dest.parent / f"{prefix}{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        began = time.perf_counter()
        saved = saved_layout(checkpoint)
        try:
            run_deepspeed_converter(checkpoint / DEEPSPEED_TAG, tmp / DEEPSPEED_TAG, workers)
            if os.environ.get(CRASH_ENV) == "1":
                os._exit(98)  # test-only: killed after converting, before the rename
            seconds = time.perf_counter() - began
            size = folder_size(tmp)
            write_json_atomic(
                tmp / UNIVERSAL_MARKER,
                {
                    "source": str(checkpoint),
                    "world_size": saved.world_size,
                    "zero_stage": saved.zero_stage,
                    "deepspeed": _deepspeed_version(),
                    "seconds": round(seconds, 3),
                    "size_bytes": size,
                },
            )
            fsync_dir(tmp)
            try:
                os.rename(tmp, dest)  # atomic; fails if another job's rename came first
            except OSError:
                if not marker.is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return Conversion(dest, 0.0, folder_size(dest), converted_now=False)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if log is not None:
        log(
            f"converted {checkpoint} ({saved.label}, {saved.world_size} rank(s)) to DeepSpeed's "
            f"universal checkpoint in {seconds:.1f} s ({size / 2**20:.1f} MiB): {dest}"
        )
    return Conversion(dest, seconds, size, converted_now=True)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def wait_until_visible(marker: Path, timeout_s: float = VISIBLE_TIMEOUT_S) -> None:
    """Ranks on other nodes: a shared filesystem may show a new folder a little later (NFS
    attribute caching); listing the parent revalidates it."""
    deadline = time.monotonic() + timeout_s
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker} is not visible on this node after {timeout_s:.0f} s")
        with contextlib.suppress(OSError):
            os.listdir(marker.parent.parent)
        time.sleep(0.5)


def universal_for_resume(
    checkpoint: Path, *, is_main: bool, log: Callable[[str], None] | None = None
) -> Path:
    """Collective: every rank calls it. The main process converts (or finds the cache) while
    the others wait at an all-reduce; all then load from the returned folder. A failure on the
    main process is raised on every rank (no rank waits forever for a conversion that died)."""
    from clustertune.distributed import raise_main_failure_everywhere

    folder = checkpoint / UNIVERSAL_DIR
    error: BaseException | None = None
    if is_main:
        try:
            folder = convert_to_universal(checkpoint, log=log).folder
        except Exception as caught:
            error = caught
    raise_main_failure_everywhere(error, f"convert {checkpoint}")
    wait_until_visible(folder / UNIVERSAL_MARKER)
    return folder


def repair_zero3_universal_load(engine: Any, universal: Path) -> None:
    """Two things DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) gets wrong when the optimizer has more
    than one param group, as ours has (weight decay, and none on biases and norms), undone here:

    - it gives every group the hyperparameters of group 0, so biases and norms would train
      with weight decay: each group's saved values are put back, from the optimizer_state.pt
      DeepSpeed read (torch.load: our own output_dir, as for every DeepSpeed file);
    - it puts one and the same `step` tensor into every group's state, and torch's Adam
      increments it in place once per group per optimizer step: with 2 groups the bias
      correction of step 7 used step 8.
    Measured on the smoke T5 (weight decay 0.01), 2 ranks -> 1, steps 7-10: 2.3e-4 relative
    off with neither repair, 1.5e-6 with the step repair only, 2e-8 with both.
    ZeRO-1/2's universal load restores both per group and needs neither."""
    import torch

    saved = torch.load(
        universal / DEEPSPEED_TAG / "zero" / "optimizer_state.pt", weights_only=False
    )
    optimizer = engine.optimizer.optimizer  # the torch optimizer over ZeRO-3's flat fp32 groups
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"{universal} has {len(groups)} optimizer param groups, this model {len(optimizer.param_groups)}"
        )
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
