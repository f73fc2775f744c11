"""Atomic, verified, resumable checkpoints in <output_dir>/checkpoints/ (layout: run_folder.py).

A checkpoint is written into checkpoints/.tmp-step_N/ by every rank; only when all ranks
have finished (a barrier) does the main process write COMPLETE.json and rename the folder
into place. A kill at any moment leaves the previous checkpoints plus at most a .tmp-
folder, which resume ignores and the next save removes. Old checkpoints are pruned only
after a new one is complete, and pruning removes only what clustertune wrote into them.

COMPLETE.json records the step, the world size, the ZeRO stage (0: no DeepSpeed) and every
file with its size and CRC-32. A resume uses the newest checkpoint whose files verify
(`choose_resume`); a damaged one is named in one warning line and never loaded. A ZeRO
checkpoint resumed on another world size is loaded from DeepSpeed's universal form of it,
made once in step_N/universal/ (reshard.py); DDP and one-process checkpoints load on any
world size.

A save that fails because of the disk or its permissions (a full disk, a folder made
read-only) is one line naming the file and the cause; the .tmp- folder is removed and the
previous checkpoint stays, so rerunning the same command resumes from it.

Weights and optimizer state we write ourselves use safetensors / torch.save of plain
tensors, read back with weights_only=True. DeepSpeed's engine files are DeepSpeed's own
format (it reads them with torch.load); they are only ever read from our own output_dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clustertune.atomicio import fsync_dir, write_json_atomic
from clustertune.distributed import all_ranks_agree, decided_by_main, gather_from_all
from clustertune.engine_moves import (
    finish_fsdp_to_universal,
    fsdp_to_universal,
    load_universal_into_fsdp,
)
from clustertune.errors import UserError
from clustertune.fsdp import load_sharded, save_sharded
from clustertune.reshard import (
    repair_zero3_universal_load,
    saved_layout,
    universal_for_resume,
    universal_info,
)
from clustertune.run_folder import (
    DEEPSPEED_TAG,
    FSDP_TAG,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    TRAINABLE_FILE,
    TRAINER_STATE,
    ResumeChoice,
    RunFolder,
    checkpoint_damage,
    foreign_entries,
    newest_verified,
    read_checkpoint_marker,
    remove_checkpoint,
    rng_file_name,
    write_checkpoint_marker,
)
from clustertune.storage import fill_disk_for_test, reported_write_failures, write_failure_cause

CRASH_ENV = "CLUSTERTUNE_TEST_CRASH_IN_SAVE"  # test-only fault injection: "RANK:STEP"
# The optimizer settings a launch's config decides, restored after loading a checkpoint's
# optimizer state (which holds the values it was saved with); lr is the schedule's.
OPTIMIZER_SETTINGS = ("betas", "eps", "weight_decay")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def choose_resume(run: RunFolder, resume: str) -> Path | None:
    """Collective: the checkpoint this launch continues from, decided by the main process
    (which reads every file once to verify it) and the same on every rank. resume=auto: the
    newest checkpoint that verifies, after one warning line naming each newer damaged one; none
    left of several: a UserError. A given path that does not verify: a UserError."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        damage = decided_by_main(lambda: checkpoint_damage(path))
        if damage is not None:
            raise UserError(
                f"resume='{resume}': the checkpoint is damaged ({damage}), so it is not loaded; "
                "resume from another checkpoints/step_N, or resume=auto for the newest one that "
                "verifies."
            )
        return path
    choice: ResumeChoice = decided_by_main(lambda: newest_verified(run))
    if choice.path is None and choice.damaged:
        raise UserError(choice.none_left())
    warning = choice.warning()
    if warning is not None and int(os.environ.get("RANK", "0")) == 0:
        print(warning, file=sys.stderr, flush=True)
    return choice.path


def restore_schedule_position(scheduler: Any, saved: dict[str, Any]) -> None:
    """Continue the LR schedule this launch built, at the checkpoint's step.

    `LambdaLR.load_state_dict` would also restore `base_lrs` and the multiplier's own
    attributes (our WarmupDecay is a callable object, so its total_steps is in the state):
    a run extended from 50 to 60 steps would keep decaying to 0 at step 50 and train its last
    10 steps at learning rate 0. Only the position (steps taken) is the checkpoint's; the
    schedule's shape is the config's. With unchanged settings both give the same values, so an
    exact resume stays exact. The optimizer state loaded before holds the old schedule's lr in
    its param groups; it is replaced by the new schedule's value at this step.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.load_state_dict(saved)  # a schedule we did not build keeps its own rules
        return
    scheduler.last_epoch = saved["last_epoch"]
    scheduler._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
    lrs = [
        base_lr * multiplier(scheduler.last_epoch)
        for base_lr, multiplier in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


class Checkpointer:
    def __init__(
        self, run: RunFolder, accelerator: Any, keep_last: int, log: Callable[[str], None]
    ) -> None:
        self.run = run
        self.accelerator = accelerator
        self.keep_last = max(1, keep_last)
        self.log = log  # main process: prints; the others: nothing

    def save(
        self,
        step: int,
        *,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        engine: str,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Collective: every rank must call it. Returns the completed folder. `engine`: ddp
        (the main process writes the whole trainable state), deepspeed (every rank its ZeRO
        partition) or fsdp2 (every rank its shard, torch.distributed.checkpoint)."""
        accel, run = self.accelerator, self.run
        final, tmp = run.checkpoint(step), run.checkpoint_tmp(step)
        previous = run.latest_complete()
        if accel.is_main_process:
            with self._reported(run.checkpoints, tmp, previous):
                run.checkpoints.mkdir(parents=True, exist_ok=True)
                for stale in run.stale_checkpoint_tmps():  # a kill or failed write during a save
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
        accel.wait_for_everyone()
        writing, failure, in_engine = tmp, None, False
        try:
            if accel.is_main_process:
                fill_disk_for_test(f"step_{step}")
            if engine == "deepspeed":
                # every rank writes its own ZeRO partition of parameters and optimizer state,
                # and the client state DeepSpeed's universal converter requires (reshard.py)
                writing, in_engine = tmp / DEEPSPEED_TAG, True
                model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state=universal_info())
                in_engine = False
            elif engine == "fsdp2":  # every rank writes its shard (DCP), in parallel
                writing, in_engine = tmp / FSDP_TAG, True
                save_sharded(writing, model, optimizer)
                in_engine = False
            elif accel.is_main_process:
                unwrapped = accel.unwrap_model(model)
                trainable = {
                    n: p.detach().cpu().contiguous()
                    for n, p in unwrapped.named_parameters()
                    if p.requires_grad
                }
                writing = tmp / TRAINABLE_FILE
                save_file(trainable, str(writing))
                writing = tmp / OPTIMIZER_FILE
                torch.save(optimizer.state_dict(), writing)
            if (
                accel.is_main_process
            ):  # the LR schedule is ours on every path, the same on all ranks
                writing = tmp / SCHEDULER_FILE
                torch.save(scheduler.state_dict(), writing)
            writing = tmp / rng_file_name(accel.process_index)
            torch.save(rng_state(), writing)
        except Exception as error:
            failure = error
            if in_engine:  # the other ranks wait in the barrier that ends DeepSpeed's save
                torch.distributed.barrier()
        if os.environ.get(CRASH_ENV) == f"{accel.process_index}:{step}":
            os._exit(99)  # test-only: die after this rank's writes, before the others finish
        # Every rank has finished writing, or failed: all agree, so none waits for another.
        if not all_ranks_agree(failure is None):
            self._failed(failure, writing, tmp, previous)
        if accel.is_main_process:
            with self._reported(tmp, tmp, previous):
                write_json_atomic(tmp / TRAINER_STATE, trainer_state)
                zero_stage = model.zero_optimization_stage() if engine == "deepspeed" else 0
                write_checkpoint_marker(
                    tmp,
                    step=step,
                    world_size=accel.num_processes,
                    zero_stage=zero_stage,
                    engine=engine,
                )
                fsync_dir(tmp)
                self._make_way(final)
                os.replace(tmp, final)
                fsync_dir(run.checkpoints)
            self._prune(step)
        accel.wait_for_everyone()
        return final

    def _reported(self, where: Path, tmp: Path, previous: Path | None) -> Any:
        return reported_write_failures(where, self._consequence(tmp, previous), cleanup=tmp)

    @staticmethod
    def _consequence(tmp: Path, previous: Path | None) -> str:
        fix = "free space (or fix the folder's permissions) and rerun the same command"
        if previous is None:
            return f"{tmp} was removed and no checkpoint was made yet: {fix} (it starts again)."
        return f"{tmp} was removed and {previous} is intact: {fix} to resume from it."

    def _failed(
        self, failure: BaseException | None, writing: Path, tmp: Path, previous: Path | None
    ) -> None:
        """After any rank failed to write: the main process removes the .tmp- folder, then
        every rank raises, with one line where the cause is the disk or the permissions."""
        cause = None if failure is None else write_failure_cause(failure, writing)
        reports = gather_from_all(None if failure is None else (str(writing), cause))
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        explained = next((r for r in reports if r is not None and r[1] is not None), None)
        if explained is not None:
            from clustertune.storage import OutputWriteError

            path, cause = explained
            raise OutputWriteError(
                f"cannot write {path}: {cause}; {self._consequence(tmp, previous)}"
            )
        if failure is not None:
            raise failure
        failed = [rank for rank, report in enumerate(reports) if report is not None]
        raise RuntimeError(f"rank(s) {failed} failed while writing {tmp} (see their log)")

    def _make_way(self, final: Path) -> None:
        """A step_N folder already there (damaged, without its marker, or of settings this
        launch was allowed to change) is replaced; files clustertune did not write are not."""
        if not final.exists():
            return
        foreign = foreign_entries(final)
        if foreign:
            raise UserError(
                f"{final} is in the way of this checkpoint and holds files clustertune did not "
                f"write ({', '.join(foreign[:3])}); move them out of checkpoints/ and rerun the "
                "same command to resume."
            )
        # a rare event (a resume that skipped this newer checkpoint): reading it once more for
        # its checksums names the right reason, damage or a settings change
        why = checkpoint_damage(final) or "of settings allowed to change"
        remove_checkpoint(final)
        self.log(f"replaced {final} ({why}) with the checkpoint of this run")

    def _prune(self, step: int) -> None:
        """Keep the newest keep_last checkpoints up to `step`; newer ones (of a timeline a
        resume abandoned: damaged ones) are replaced when this run reaches their step."""
        upto = [(s, path) for s, path in self.run.complete_checkpoints() if s <= step]
        for _, old in upto[: -self.keep_last]:
            left = remove_checkpoint(old)
            if left:
                self.log(
                    f"kept {old} when pruning: it holds files clustertune did not write "
                    f"({', '.join(left[:3])})"
                )

    def load(
        self,
        path: Path,
        *,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        engine: str,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Collective. Restore model, optimizer, schedule and this rank's RNG; return the
        trainer state. A ZeRO checkpoint of another world size (or of the other ZeRO-1/2
        stage) is loaded from its universal form, converted once (reshard.py); the engine was
        then built with checkpoint.load_universal (reshard.universal_load_config). The
        optimizer keeps this launch's OPTIMIZER_SETTINGS (the same unless the config changed
        them, with allow_config_change=true)."""
        accel = self.accelerator
        saved_world_size = read_checkpoint_marker(path)["world_size"]
        with launch_optimizer_settings(optimizer):
            self._load_model_and_optimizer(path, model, optimizer, engine, log)
        restore_schedule_position(scheduler, torch.load(path / SCHEDULER_FILE, weights_only=True))
        # RNG: rank r restores the state rank r saved. On more ranks than the checkpoint had,
        # rank r takes the state of rank r mod (saved world size): every rank starts from the
        # same seed (set_seed), so that is a position the run's streams reached, not the seed
        # again (which would repeat step 1's random numbers). Which examples a rank sees is
        # the batch plan's (a function of step and world size, not of any RNG), so with
        # dropout 0 the losses do not depend on this; with dropout > 0 no reshard can repeat
        # the old masks, since each rank now draws them for other examples.
        rank = accel.process_index
        rng_file = path / rng_file_name(rank)
        if not rng_file.is_file():
            rng_file = path / rng_file_name(rank % saved_world_size)
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / TRAINER_STATE).read_text())

    def _load_model_and_optimizer(
        self, path: Path, model: Any, optimizer: Any, engine: str, log: Any
    ) -> None:
        accel = self.accelerator
        saved = saved_layout(path)
        if engine == "fsdp2" and saved.is_deepspeed:  # a ZeRO run continued under FSDP2
            universal = universal_for_resume(path, is_main=accel.is_main_process, log=log)
            load_universal_into_fsdp(universal / DEEPSPEED_TAG, model, optimizer)
        elif engine == "fsdp2":  # DCP reshards to this launch's world size as it reads
            load_sharded(path / FSDP_TAG, model, optimizer)
        elif saved.is_fsdp:  # an FSDP2 run continued under ZeRO
            universal = fsdp_to_universal(path, model, is_main=accel.is_main_process, log=log)
            _load_engine_checkpoint(model, universal, zero3_repair=True)
            finish_fsdp_to_universal(universal, is_main=accel.is_main_process)
        elif engine == "deepspeed":
            load_dir = path
            if model.load_universal_checkpoint():
                load_dir = universal_for_resume(path, is_main=accel.is_main_process, log=log)
            _load_engine_checkpoint(model, load_dir, zero3_repair=load_dir != path)
        else:  # the whole trainable state in two files: any world size loads them as they are
            unwrapped = accel.unwrap_model(model)
            saved = load_file(str(path / TRAINABLE_FILE))
            result = unwrapped.load_state_dict(saved, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(
                    f"checkpoint {path} has parameters this model lacks: {result.unexpected_keys[:5]}"
                )
            optimizer.load_state_dict(
                torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
            )


def _load_engine_checkpoint(model: Any, load_dir: Path, zero3_repair: bool) -> None:
    """The DeepSpeed engine loads `load_dir` (a checkpoint, or its universal form)."""
    load_path, _ = model.load_checkpoint(
        str(load_dir),
        tag=DEEPSPEED_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {load_dir}")
    if zero3_repair and model.zero_optimization_stage() == 3:
        repair_zero3_universal_load(model, load_dir)


@contextlib.contextmanager
def launch_optimizer_settings(optimizer: Any) -> Iterator[None]:
    """Keep the optimizer's OPTIMIZER_SETTINGS (this launch's config) across the loading of a
    checkpoint's optimizer state, which brings the values it was saved with."""
    settings = [
        {key: group[key] for key in OPTIMIZER_SETTINGS if key in group}
        for group in optimizer.param_groups
    ]
    yield
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        raise RuntimeError(
            f"the checkpoint's optimizer has {len(groups)} parameter groups, this launch's "
            f"{len(settings)}"
        )
    for group, values in zip(groups, settings, strict=True):
        group.update(values)
