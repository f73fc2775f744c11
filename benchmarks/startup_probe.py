#!/usr/bin/env python
"""recipes/finetune.py with a clock on each start-up phase, for benchmarks/scaling.py.

    CT_STARTUP_JSON=out.json CT_COMMAND_TIME=<time.time() when the command was issued> \
        clustertune-launch --config_file launch/zero2.yaml --num_processes 2 \
        benchmarks/startup_probe.py --config ... [--section.key=value ...]

It runs the recipe's own main() unchanged; before that it wraps (in this process only) the
library functions the recipe's setup calls, to note when each starts and ends:
  imports          the recipe's imports (torch, transformers, datasets, clustertune)
  import_deepspeed DeepSpeed launches only: `import deepspeed` (the engine build would do it)
  config           parse_config + the checks before any compute (Runtime.resolve)
  process_group    Runtime.start (gloo/NCCL process group, seeds)
  tokenizer        load_tokenizer
  data             load_training_data: read + tokenise (datasets cache miss) or read the cache (hit)
  batching         resolve_batching (the plan; the micro-batch search when it is auto)
  accelerator      Runtime.make_accelerator (accelerate state, the DeepSpeed plugin)
  model_and_engine Trainer._setup_model: weights loaded, optimizer, DDP wrap or deepspeed.initialize
                   (of which deepspeed_op_build: DeepSpeed op builders' load(), 0 when none runs)
  first_step       from train() to the end of the first optimizer step (incl. any eval before)
The main process writes the timeline as JSON; every rank writes its peak resident memory (the
kernel's VmHWM: after setup, and at the end) beside it as <json>.rank<R>. Nothing else changes
(the run trains as usual).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

COMMAND_TIME = float(os.environ.get("CT_COMMAND_TIME", "nan"))
PROCESS_START = time.time()
REPO = Path(__file__).resolve().parents[1]
phases: dict[str, float] = {}  # name -> seconds
marks: dict[str, float] = {"process_start": PROCESS_START}  # name -> time.time()


def timed(owner: object, name: str, phase: str) -> None:
    """Wrap owner.name so its calls add to `phase` (skipped if the library renamed it)."""
    original = getattr(owner, name, None)
    if original is None:
        phases.setdefault(f"{phase} (not found: {name})", 0.0)
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
            marks.setdefault(f"{phase}_end", time.time())

    setattr(owner, name, wrapper)


def vm_hwm() -> int:
    """This process's peak resident memory so far, bytes (the kernel's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def main() -> int:
    start = time.perf_counter()
    import clustertune.quiet  # noqa: F401
    from clustertune import config, runtime, train, training_data  # noqa: F401
    from clustertune.distributed import DDPStepper, DeepSpeedStepper
    from clustertune.fsdp import FSDPStepper

    phases["imports"] = time.perf_counter() - start
    loaded = [m for m in ("deepspeed", "peft", "accelerate", "datasets") if m in sys.modules]
    marks["imports_end"] = time.time()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # The engine build would import it; timed on its own here, so the op build is visible.
        start = time.perf_counter()
        from deepspeed.ops.op_builder.builder import OpBuilder

        phases["import_deepspeed"] = time.perf_counter() - start
        timed(OpBuilder, "load", "deepspeed_op_build")
    timed(config, "parse_config", "config")
    timed(runtime.Runtime, "resolve", "config")
    timed(runtime.Runtime, "start", "process_group")
    timed(train, "load_tokenizer", "tokenizer")
    timed(train, "load_training_data", "data")
    timed(train, "resolve_batching", "batching")
    timed(runtime.Runtime, "make_accelerator", "accelerator")
    timed(train.Trainer, "_setup_model", "model_and_engine")
    timed(train.Trainer, "setup", "setup_total")
    peaks: dict[str, int] = {}
    original_setup = train.Trainer.setup

    def setup_with_peak(self):
        try:
            return original_setup(self)
        finally:
            peaks["peak_rss_after_setup_bytes"] = vm_hwm()

    train.Trainer.setup = setup_with_peak
    for stepper in (DDPStepper, DeepSpeedStepper, FSDPStepper):
        original = stepper.optimizer_step

        def first_step_end(self, _original=original):
            result = _original(self)
            marks.setdefault("first_optimizer_step_end", time.time())
            return result

        stepper.optimizer_step = first_step_end
    original_train = train.Trainer.train

    def train_with_mark(self):
        marks.setdefault("train_start", time.time())
        return original_train(self)

    train.Trainer.train = train_with_mark
    spec = importlib.util.spec_from_file_location("finetune_recipe", REPO / "recipes/finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sys.argv[0] = str(REPO / "recipes/finetune.py")
    try:
        return recipe.main()
    finally:
        if os.environ.get("CT_STARTUP_JSON"):
            peaks["peak_rss_bytes"] = vm_hwm()
            rank = os.environ.get("RANK", "0")
            Path(f"{os.environ['CT_STARTUP_JSON']}.rank{rank}").write_text(json.dumps(peaks))
        if os.environ.get("RANK", "0") == "0" and os.environ.get("CT_STARTUP_JSON"):
            first = marks.get("first_optimizer_step_end")
            phases["first_step"] = first - marks["train_start"] if first else float("nan")
            Path(os.environ["CT_STARTUP_JSON"]).write_text(
                json.dumps(
                    {
                        "launcher_seconds": PROCESS_START - COMMAND_TIME,
                        "phases": phases,
                        "command_to_first_step_seconds": (first or float("nan")) - COMMAND_TIME,
                        "marks": marks,
                        "modules_loaded_by_the_imports": loaded,
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    sys.exit(main())
