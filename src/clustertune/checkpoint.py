"""Atomic, resumable checkpoints under <output_dir>/checkpoints/step_N/.

A checkpoint is written into checkpoints/.tmp-step_N/ by every rank; only when all ranks
have finished (a barrier) does the main process write COMPLETE.json and rename the folder
into place. A kill at any moment leaves the previous checkpoints plus at most a .tmp-
folder, which resume ignores and the next save removes. Old checkpoints are pruned only
after a new one is complete.

COMPLETE.json records the step, the world size and the ZeRO stage (0: no DeepSpeed). A ZeRO
checkpoint resumed on another world size is loaded from DeepSpeed's universal form of it, made
once in step_N/universal/ (reshard.py); DDP and one-process checkpoints load on any world size.

Weights and optimizer state we write ourselves use safetensors / torch.save of plain
tensors, read back with weights_only=True. DeepSpeed's engine files are DeepSpeed's own
format (it reads them with torch.load); they are only ever read from our own output_dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clustertune.atomicio import fsync_dir, write_json_atomic

MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "engine"
CRASH_ENV = "CLUSTERTUNE_TEST_CRASH_IN_SAVE"  # test-only fault injection: "RANK:STEP"


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


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A folder without the marker is never used."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.glob("step_*"):
            if (path / MARKER).is_file() and path.name[5:].isdigit():
                found.append((int(path.name[5:]), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


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
    def __init__(self, output_dir: Path, accelerator: Any, keep_last: int) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[tuple[int, Path]]:
        return complete_checkpoints(self.root.parent)

    def save(
        self,
        step: int,
        *,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        is_deepspeed: bool,
        trainer_state: dict[str, Any],
    ) -> Path:
        """Collective: every rank must call it. Returns the completed folder."""
        accel = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if accel.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):  # left by a kill during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accel.wait_for_everyone()
        if is_deepspeed:
            # every rank writes its own ZeRO partition of parameters and optimizer state, and
            # the client state DeepSpeed's universal converter requires (see reshard.py)
            model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state=universal_info())
        elif accel.is_main_process:
            unwrapped = accel.unwrap_model(model)
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in unwrapped.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, str(tmp / "trainable_parameters.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accel.is_main_process:  # the LR schedule is ours on every path, identical on all ranks
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / f"rng_rank{accel.process_index}.pt")
        if os.environ.get(CRASH_ENV) == f"{accel.process_index}:{step}":
            os._exit(99)  # test-only: die after this rank's writes, before the others finish
        accel.wait_for_everyone()  # every rank has finished writing
        if accel.is_main_process:
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
            zero_stage = model.zero_optimization_stage() if is_deepspeed else 0
            marker = {"step": step, "world_size": accel.num_processes, "zero_stage": zero_stage}
            write_json_atomic(tmp / MARKER, marker)
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accel.wait_for_everyone()
        return final

    def load(
        self,
        path: Path,
        *,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        is_deepspeed: bool,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Collective. Restore model, optimizer, schedule and this rank's RNG; return the
        trainer state. A ZeRO checkpoint of another world size (or of the other ZeRO-1/2
        stage) is loaded from its universal form, converted once (reshard.py); the engine was
        then built with checkpoint.load_universal (reshard.universal_load_config)."""
        accel = self.accelerator
        saved_world_size = json.loads((path / MARKER).read_text())["world_size"]
        if is_deepspeed:
            load_dir = path
            if model.load_universal_checkpoint():
                from clustertune.reshard import universal_for_resume

                load_dir = universal_for_resume(path, is_main=accel.is_main_process, log=log)
            load_path, _ = model.load_checkpoint(
                str(load_dir),
                tag=DEEPSPEED_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {load_dir}")
            if load_dir != path and model.zero_optimization_stage() == 3:
                from clustertune.reshard import repair_zero3_universal_load

                repair_zero3_universal_load(model, load_dir)
        else:  # the whole trainable state in two files: any world size loads them as they are
            unwrapped = accel.unwrap_model(model)
            saved = load_file(str(path / "trainable_parameters.safetensors"))
            result = unwrapped.load_state_dict(saved, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(
                    f"checkpoint {path} has parameters this model lacks: {result.unexpected_keys[:5]}"
                )
            optimizer.load_state_dict(
                torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            )
        restore_schedule_position(scheduler, torch.load(path / "scheduler.pt", weights_only=True))
        # RNG: rank r restores the state rank r saved. On more ranks than the checkpoint had,
        # rank r takes the state of rank r mod (saved world size): every rank starts from the
        # same seed (set_seed), so that is a position the run's streams reached, not the seed
        # again (which would repeat step 1's random numbers). Which examples a rank sees is
        # the batch plan's (a function of step and world size, not of any RNG), so with
        # dropout 0 the losses do not depend on this; with dropout > 0 no reshard can repeat
        # the old masks, since each rank now draws them for other examples.
        rank = accel.process_index
        rng_file = path / f"rng_rank{rank}.pt"
        if not rng_file.is_file():
            rng_file = path / f"rng_rank{rank % saved_world_size}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / TRAINER_STATE).read_text())
