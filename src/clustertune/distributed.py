"""The launch as the processes see it (world size, the DeepSpeed JSON named by the launch
file), the process group and what every rank must call together on it (agreeing, one decision
taken by the main process, gathering), the Accelerator, and the two ways an optimizer step is
driven. The DeepSpeed JSON itself is clustertune.deepspeed_config (filling) and
deepspeed_check, which build on this module (never the other way round)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from clustertune.errors import UserError

T = TypeVar("T")


def launched_world_size() -> int:
    """World size from the launcher's environment, known before any process group exists,
    so batch arithmetic can be checked before anything expensive starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path() -> str | None:
    """The DeepSpeed JSON named by the accelerate launch file, if this is a DeepSpeed launch."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def init_process_state(use_deepspeed: bool) -> Any:
    """The process group, before the Accelerator (auto batch sizing needs it first).

    On CPU-only machines: gloo for DeepSpeed (else accelerate 1.15 reports one process), and
    cpu=True for DDP launch files (else distributed_type is NO and no DDP wrapping happens).
    Idempotent: PartialState is a singleton.
    """
    from accelerate import PartialState

    if use_deepspeed and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        warn_stale_extension_locks()  # before DeepSpeed's comm set-up builds or loads its ops
    if not torch.cuda.is_available():
        if use_deepspeed:
            return PartialState(backend="gloo")
        if launched_world_size() > 1:
            return PartialState(cpu=True)
    return PartialState()


def leave_process_group() -> None:
    """The last call of every rank after a run. Exiting with the process group (gloo's threads)
    still alive can end a process in std::terminate, "terminate called without an active
    exception" + SIGABRT, after all its work is done: seen on CPU under load after a complete
    ZeRO-3 run, which torchrun then reports as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decided_by_main(decide: Callable[[], T]) -> T:
    """Every rank gets what `decide()` returns on the main process (which alone runs it, e.g.
    reading a checkpoint once to verify it); a UserError it raises is raised on every rank.
    Every rank must call it. Without a process group: decide() here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            message = [("value", decide())]
        except UserError as error:
            message = [("user_error", str(error))]
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "user_error":
        raise UserError(value)
    return value


def gather_from_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (a list of one without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_ranks_agree(ok: bool) -> bool:
    """True only if `ok` on every rank (all-reduce MIN); every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    from accelerate import PartialState

    flag = torch.tensor([1 if ok else 0], device=PartialState().device, dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def raise_main_failure_everywhere(error: BaseException | None, what: str) -> None:
    """Collective: after the main process tried `what` (catching `error`), every rank raises
    if it failed, the main process its own exception, the others one line pointing at its log,
    so no rank goes on to wait for a result that will never come."""
    if not all_ranks_agree(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"the main process could not {what} (see its log)")


STALE_LOCK_SECONDS = 600  # a DeepSpeed op JIT build takes ~1.5 min on 2 CPU cores


def stale_extension_locks(
    max_age_s: float = STALE_LOCK_SECONDS, now: float | None = None
) -> list[Path]:
    """torch's JIT extension builds (DeepSpeed's ops, e.g. its CPU shm comm op) hold a `lock`
    file in the op's build folder; a process killed mid-build leaves it behind, and every later
    launch then waits for it forever, silently. Lock files older than max_age_s."""
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions"
    )
    now = time.time() if now is None else now
    stale = []
    for lock in sorted({*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")}):
        try:
            if now - lock.stat().st_mtime > max_age_s:
                stale.append(lock)
        except OSError:  # removed meanwhile: a build just finished
            continue
    return stale


@functools.cache  # once per process: init_process_state is called again by build_accelerator
def warn_stale_extension_locks() -> None:
    for lock in stale_extension_locks():
        print(
            f"clustertune: warning: {lock} is {STALE_LOCK_SECONDS // 60}+ minutes old; if no build of "
            f"'{lock.parent.name}' is running, an earlier process was killed while building it and this "
            f"run will wait forever: stop it, `rm -rf {lock.parent}` and launch again (it rebuilds).",
            file=sys.stderr,
            flush=True,
        )


def build_accelerator(
    *,
    ds_config: dict | None,
    dtype: str,
    project_dir: str,
    report_to: list[str],
    zero3_init: bool = False,
    fsdp: bool = False,
) -> Any:
    """Create the Accelerator for this launch, correct on GPU and on CPU-only machines.

    CPU-only workarounds (both seen with accelerate 1.15):
    - DeepSpeed: accelerate 1.15 reports num_processes == 1 under a 2-process launch unless a
      gloo PartialState exists first; DeepSpeed's batch assertion then fails.
    - DDP launch files (distributed_type MULTI_GPU): without cpu=True accelerate sets
      distributed_type NO and every rank silently trains alone. cpu=True gives MULTI_CPU,
      real DDP over gloo.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    has_cuda = torch.cuda.is_available()
    mixed_precision = {"bf16": "bf16", "fp16": "fp16"}.get(dtype, "no")
    kwargs: dict[str, Any] = dict(
        mixed_precision=mixed_precision,
        project_dir=project_dir,
        log_with=report_to or None,
        # The schedule is stepped once per optimizer step by us (or by the DeepSpeed engine);
        # accelerate's default steps it num_processes times per call.
        step_scheduler_with_optimizer=False,
    )
    init_process_state(use_deepspeed=ds_config is not None)
    if ds_config is not None:
        # zero3_init (ZeRO-3): the plugin's HfDeepSpeedConfig makes from_pretrained build the
        # model already partitioned (zero.Init); modeling.build_model opts out where that is wrong.
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=zero3_init)
        kwargs["deepspeed_plugin"] = plugin
        kwargs["gradient_accumulation_steps"] = ds_config["gradient_accumulation_steps"]
    elif not has_cuda and launched_world_size() > 1:
        kwargs["cpu"] = True
    if fsdp:  # clustertune shards the model itself (fsdp.py); accelerate places devices
        from clustertune.fsdp import accelerate_without_fsdp

        with accelerate_without_fsdp():
            return Accelerator(**kwargs)
    return Accelerator(**kwargs)


class DeepSpeedStepper:
    """Under DeepSpeed the engine owns accumulation, clipping and the optimizer step. The LR
    schedule is ours (a LambdaLR stepped here), unless the DeepSpeed JSON names a scheduler:
    the engine then builds it and steps it inside engine.step() at the accumulation boundary,
    and `scheduler` is None here so that no second schedule moves the learning rate.

    engine.backward divides the loss by grad_accum_steps and the engine averages gradients
    over ranks, so the caller's loss is pre-multiplied by both (see loss_multiplier).
    """

    def __init__(self, engine: Any, scheduler: Any | None) -> None:
        self.engine, self.scheduler = engine, scheduler

    def micro_step(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # ZeRO reduces gradients at the boundary itself

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last_micro_batch)
        self.engine.backward(loss)
        self.engine.step()  # a no-op except at the accumulation boundary

    def optimizer_step(self) -> float:
        if self.scheduler is not None:
            self.scheduler.step()  # once per optimizer step, after the engine's boundary step
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def loss_multiplier(self, world_size: int, grad_accum_steps: int) -> int:
        return world_size * grad_accum_steps


class DDPStepper:
    """Plain PyTorch / DDP: accumulate under no_sync, then clip and step ourselves."""

    def __init__(
        self, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float
    ) -> None:
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def micro_step(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        # DDP decides in forward whether backward all-reduces: wrap forward and backward.
        return (
            contextlib.nullcontext()
            if is_last_micro_batch
            else self.accelerator.no_sync(self.model)
        )

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def loss_multiplier(self, world_size: int, grad_accum_steps: int) -> int:
        return world_size  # DDP averages gradients over ranks; accumulation just sums
