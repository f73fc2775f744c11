"""One train loop for full and LoRA fine-tuning, seq2seq and decoder-only, DDP and ZeRO.

Lifecycle (as in torchtune): setup() -> train() -> save_final() -> cleanup().

Loss normalisation. The loss of one optimizer step is
    sum of token losses over the whole global batch / target tokens in the global batch.
Each micro-batch contributes its token-loss sum divided by the global-batch token count,
which every rank knows from the deterministic batch plan (no communication). Gradient
averaging over world_size ranks (and DeepSpeed's 1/grad_accum scaling) is undone by the
stepper's multiplier, so 1 rank x micro 8 and 2 ranks x micro 2 x accum 2 give the same
update, and short and long examples weigh by their tokens, not by their micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clustertune import data as data_lib
from clustertune.autobatch import SearchResult
from clustertune.checkpoint import Checkpointer, choose_resume
from clustertune.config import FinetuneConfig, flat_config
from clustertune.deepspeed_config import check_optimizer_and_scheduler, zero_stage
from clustertune.distributed import DDPStepper, DeepSpeedStepper, launched_world_size
from clustertune.errors import UserError
from clustertune.fsdp import apply_fsdp_model_settings
from clustertune.metrics import MetricsLog, ThroughputWindow, peak_memory_gib, plot_training
from clustertune.modeling import (
    build_model,
    check_attention_kernel,
    count_parameters,
    load_model_config,
    load_tokenizer,
    model_kind,
)
from clustertune.optim import prepare_optimization, schedule_change_note, token_loss_sum
from clustertune.packing import check_packing_isolates
from clustertune.reshard import needs_universal, reshard_note, universal_load_config
from clustertune.run_folder import CHECKPOINT_MARKER, CONFIG_FILE, RunFolder
from clustertune.run_identity import (
    check_checkpoint_folder,
    check_finished_run,
    check_resumable,
    final_prompt_settings,
    fingerprint,
    schedule_record,
)
from clustertune.runtime import Runtime, strategy_label
from clustertune.sampler import (
    GlobalBatchPlan,
    check_batch_arithmetic,
)
from clustertune.stop import StopFlag, StopForRequeue, record_run_folder
from clustertune.storage import reported_write_failures
from clustertune.training_data import (
    TrainData,
    check_data_for_model,
    eval_batches,
    load_training_data,
    resolve_batching,
)


class Trainer:
    # ------------------------------------------------------------ set in __init__
    cfg: FinetuneConfig
    output_dir: Path
    run: RunFolder  # the paths of output_dir's layout
    # ------------------------------------------------------------ set in setup()
    runtime: Runtime  # world size, model config, kind, dtype, DeepSpeed JSON, process group
    tokenizer: Any
    data: TrainData
    total_steps: int  # train.max_steps, or num_epochs x steps per epoch
    identity: dict[str, Any]  # resolved settings in the run's fingerprint (the chat template)
    auto_batch: SearchResult | None  # the search trace when train.micro_batch_size is auto
    micro_batch_size: int  # examples per micro-batch (1, nominal, with a token budget)
    micro_batch_tokens: int  # token budget per micro-batch; 0: micro_batch_size examples
    # global_batch_size / (micro_batch_size x world_size); with a token budget, the most
    # micro-steps per rank of any step (DeepSpeed divides each loss by it; stepper undoes it)
    grad_accum_steps: int
    ds_config: dict | None  # the DeepSpeed JSON with every "auto" filled; None without ZeRO
    accelerator: Any
    checkpointer: Checkpointer
    plan: GlobalBatchPlan  # which examples make each global batch and this rank's micro-batches
    model: Any  # the prepared model (the DeepSpeed engine under ZeRO)
    optimizer: Any
    scheduler: Any  # our LambdaLR, or the schedule a DeepSpeed JSON names (its engine steps it)
    stepper: DDPStepper | DeepSpeedStepper
    loss_multiplier: int  # undoes gradient averaging over ranks (and DeepSpeed's 1/accum)
    metrics: MetricsLog
    start_step: int  # 0 for a fresh run, the checkpoint's step after a resume
    stop_flag: StopFlag
    # ------------------------------------------------------------ set in train()
    initial_eval_loss: float | None = None  # eval loss before the first step of a fresh run
    # each source's eval loss at the last evaluate() ({"eval_loss/<name>": ...}; a mixture)
    eval_by_source: dict[str, float] = {}
    progress: Any = None  # the main process's progress bar while train() runs

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.run = RunFolder(self.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> bool:
        """Build everything; return False when the run already finished (nothing to do)."""
        cfg = self.cfg
        self.runtime = runtime = self._validate_before_compute()
        runtime.start(cfg.seed)
        if runtime.fsdp:
            for note in apply_fsdp_model_settings(runtime.fsdp, cfg.model):
                runtime.log(note)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.data = load_training_data(cfg, runtime, self.tokenizer)
        steps_per_epoch = len(self.data.train) // cfg.train.global_batch_size
        self.total_steps = (
            cfg.train.max_steps
            if cfg.train.max_steps > 0
            else cfg.train.num_epochs * steps_per_epoch
        )
        # Decisions against what the folder holds, before any compute: nothing in it is
        # touched (not even config.yaml) unless this launch is allowed to continue it.
        # the chat template the rows were rendered with belongs to the run's identity
        self.identity = self.data.template.identity() if self.data.template else {}
        finished = check_finished_run(cfg, self.output_dir, self.total_steps, self.identity)
        if finished.already_finished:
            runtime.log(
                f"clustertune: {self.output_dir} already finished at step {self.total_steps} "
                "(final/ is complete); nothing to do."
            )
            return False
        notes = [finished.note] if finished.note else []
        record_run_folder(self.output_dir)  # clustertune-launch names its checkpoint after a crash
        resume_from = choose_resume(self.run, cfg.resume)  # verified (collective)
        if resume_from is not None:
            resume_note = check_resumable(
                resume_from,
                cfg,
                total_steps=self.total_steps,
                world_size=runtime.world_size,
                ds_config=runtime.deepspeed_template,
                extra=self.identity,
                engine=runtime.engine,
            )
            notes += [resume_note] if resume_note else []
        self._check_outputs_fit(resume_from)
        batching = resolve_batching(cfg, runtime, self.tokenizer, self.data, self.total_steps)
        self.auto_batch, self.plan = batching.auto_batch, batching.plan
        self.micro_batch_size, self.micro_batch_tokens = batching.micro_batch_size, batching.tokens
        self.grad_accum_steps = batching.grad_accum_steps
        # With a token budget DeepSpeed's batch fields are nominal (1 x most micro-steps x
        # world): its engine only asserts their product and divides each loss by the middle one.
        self.ds_config = runtime.deepspeed_config(
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            max_grad_norm=cfg.train.max_grad_norm,
        )
        # another world size: the engine loads a universal checkpoint (read when it is built)
        self.ds_config = universal_load_config(self.ds_config, resume_from, runtime.world_size)
        self.accelerator = runtime.make_accelerator(self.ds_config, report_to=cfg.train.report_to)
        self.checkpointer = Checkpointer(
            self.run, self.accelerator, cfg.checkpoint.keep_last, log=runtime.log
        )
        self._setup_model()
        if cfg.data.packing:
            runtime.log(check_packing_isolates(self.model, len(self.tokenizer), self.accelerator))
        for note in notes:
            runtime.log(note)
        self.metrics = MetricsLog(self.run.metrics, enabled=runtime.is_main)
        self.start_step = 0
        if resume_from is not None:
            self._resume(resume_from)
        elif runtime.is_main:
            self.metrics.truncate_after(-1)  # a fresh run: a fresh metrics file
        # Only now, with every check passed and the model built: a refused or failed launch
        # leaves the run's config.yaml (its single source of truth) as it was.
        runtime.write_resolved_config(cfg, CONFIG_FILE, header=self._config_header())
        if self.auto_batch is not None:
            self.metrics.write(
                {"step": self.start_step, "event": "auto_batch", **self.auto_batch.to_json()}
            )
        if self.data.shares:  # what each source of the mixture gave: examples and tokens
            self.metrics.write(
                {
                    "step": self.start_step,
                    "event": "mixture",
                    "weights": cfg.data.mixture_weights,
                    "sources": [asdict(share) for share in self.data.shares],
                }
            )
        if cfg.train.report_to:
            self.accelerator.init_trackers("clustertune", config=flat_config(cfg))
        self.stop_flag = StopFlag()
        self.stop_flag.install()
        return True

    def _validate_before_compute(self) -> Runtime:
        """Every user mistake we can see without a process group is raised here (the values
        of each config section are already checked by the config dataclasses)."""
        cfg = self.cfg
        check_attention_kernel(cfg.model.attn_implementation)
        cfg.train.check_trackers_installed()  # here, not in validate(): evaluation reads
        # a run's config.yaml on machines that need not have its trackers
        if not cfg.train.micro_batch_tokens:  # a token budget deals examples unevenly
            check_batch_arithmetic(
                cfg.train.global_batch_size, cfg.train.micro_batch_size, launched_world_size()
            )
        if (
            cfg.resume not in ("auto", "never")
            and not (Path(cfg.resume) / CHECKPOINT_MARKER).is_file()
        ):
            raise UserError(
                f"resume='{cfg.resume}' is not a complete checkpoint folder; "
                "use auto, never, or a checkpoints/step_N path."
            )
        if not (cfg.data.train_file or cfg.data.dataset or cfg.data.mixture):
            raise UserError(
                "no training data: set data.train_file (a file or hub id), data.dataset or "
                "data.mixture."
            )
        # before Runtime.resolve, which creates output_dir: a refusal leaves nothing behind
        check_data_for_model(cfg.data, model_kind(load_model_config(cfg.model.name_or_path)))
        runtime = Runtime.resolve(
            model_name=cfg.model.name_or_path,
            requested_dtype=cfg.model.dtype,
            output_dir=self.output_dir,
        )
        # a DeepSpeed optimizer/scheduler block that contradicts train.* (the total-steps part
        # waits for the run length, in _setup_model)
        check_optimizer_and_scheduler(runtime.deepspeed_template, cfg.train)
        if cfg.resume not in ("auto", "never"):  # the launch decides which files it needs
            check_checkpoint_folder(Path(cfg.resume), engine=runtime.engine)
        if cfg.resume == "never" and (self.run.checkpoints.is_dir() or self.run.final.is_dir()):
            raise UserError(
                f"output_dir '{self.output_dir}' already holds a run and resume=never would "
                "overwrite it; use another output_dir or resume=auto."
            )
        return runtime

    def _check_outputs_fit(self, resume_from: Path | None) -> None:
        """Before the batch-size search and step 1: checkpoints/ and final/ writable, and room
        under output_dir for what the run will write (plan_disk.check_outputs_fit)."""
        from clustertune.plan_disk import check_outputs_fit

        runtime = self.runtime
        stage = zero_stage(runtime.deepspeed_template)
        converts = resume_from is not None and needs_universal(
            resume_from,
            world_size=runtime.world_size,
            zero_stage=stage,
            fsdp=runtime.fsdp is not None,
        )
        check_outputs_fit(
            self.cfg,
            self.run,
            model_config=runtime.model_config,
            world_size=runtime.world_size,
            zero_stage=stage,
            dtype=runtime.dtype,
            converts=converts,
            fsdp=runtime.fsdp is not None,
        )

    def _setup_model(self) -> None:
        cfg, runtime, accel = self.cfg, self.runtime, self.accelerator
        model = build_model(cfg.model, cfg.peft, runtime.model_config, len(self.tokenizer))
        trainable, total = count_parameters(model)
        runtime.log(
            f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%), "
            f"{runtime.kind}, {cfg.peft.method}, dtype {runtime.dtype}, "
            f"{strategy_label(self.ds_config, runtime.world_size, runtime.fsdp)}"
        )
        model, optimizer, scheduler, self.stepper = prepare_optimization(
            model,
            cfg.train,
            accel,
            log=runtime.log,
            total_steps=self.total_steps,
            fsdp=runtime.fsdp,
            dtype=runtime.dtype,
        )
        if runtime.is_deepspeed:  # now with the optimizer / scheduler "auto"s filled
            self.ds_config = accel.state.deepspeed_plugin.deepspeed_config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_multiplier = self.stepper.loss_multiplier(
            runtime.world_size, self.grad_accum_steps
        )

    def _resume(self, path: Path) -> None:
        start = time.perf_counter()
        state = self.checkpointer.load(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            engine=self.runtime.engine,
            log=self.runtime.log,
        )
        self.start_step = state["step"]
        self.metrics.truncate_after(self.start_step)
        self.runtime.log(
            f"resumed from {path} at step {self.start_step} of {self.total_steps} "
            f"({reshard_note(state['world_size'], self.runtime.world_size)}loaded in "
            f"{time.perf_counter() - start:.2f} s)"
        )
        if state.get("total_steps", self.total_steps) != self.total_steps:
            self.runtime.log(
                schedule_change_note(
                    self.cfg.train,
                    previous_total=state["total_steps"],
                    total_steps=self.total_steps,
                    next_step=self.start_step + 1,
                    next_lr=self.scheduler.get_last_lr()[0],
                )
            )

    def _config_header(self) -> str:
        return (
            "# Resolved config of this run (the single source of truth); rerun with:\n"
            "#   accelerate launch --config_file <launch.yaml> recipes/finetune.py "
            f"--config {self.run.config}\n"
        )

    # ------------------------------------------------------------------ train
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Exact mean token loss over the eval set (with several sources, also each source's,
        in eval_by_source). Every rank runs the same number of forwards (ZeRO-3 gathers
        parameters collectively in each one)."""
        if self.data.eval is None:
            return None
        self.model.eval()
        parts = self.data.eval_parts or {"": self.data.eval}
        totals = {name: self._loss_totals(split) for name, split in parts.items()}
        self.model.train()
        self.eval_by_source = {
            f"eval_loss/{name}": float(total[0] / total[1])
            for name, total in totals.items()
            if name
        }
        return float(sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values()))

    def _loss_totals(self, eval_data: Any) -> torch.Tensor:
        """(token-loss sum, target tokens) of one eval split, summed over the ranks."""
        accel = self.accelerator
        targets = data_lib.column(eval_data, "num_target_tokens")
        totals = torch.zeros(2, device=accel.device, dtype=torch.float64)
        for indices, is_padding in eval_batches(
            self.cfg, eval_data, self.runtime, self.micro_batch_size, self.micro_batch_tokens
        ):
            batch = self.data.collate(indices, eval_data, self.accelerator.device)
            loss_sum = token_loss_sum(self.model, batch, self.runtime.kind)
            if not is_padding:
                totals[0] += loss_sum.double()
                totals[1] += int(targets[indices].sum())  # the tokens the loss sums over
        return accel.reduce(totals, reduction="sum")

    def train(self) -> None:
        """Every step, checkpoints and the final eval. A write into the run folder that fails
        because of the disk or its permissions (metrics.jsonl, a checkpoint) is one line."""
        try:
            with reported_write_failures(self.output_dir, self._rerun_hint):
                self._train()
        finally:
            if self.progress is not None:  # its line ends before any error line is printed
                self.progress.close()

    def _rerun_hint(self) -> str:
        latest = self.run.latest_complete()
        where = f"it resumes from {latest}" if latest else "it starts again from step 0"
        return f"free space (or fix the permissions) and rerun the same command: {where}."

    def _train(self) -> None:
        cfg, accel, runtime = self.cfg, self.accelerator, self.runtime
        train_cfg = cfg.train
        if self.start_step == 0:
            self.initial_eval_loss = self.evaluate()
            if self.initial_eval_loss is not None:
                runtime.log(f"eval loss before training: {self.initial_eval_loss:.4f}")
                self.metrics.write(
                    {"step": 0, "eval_loss": self.initial_eval_loss, **self.eval_by_source}
                )
        self.model.train()
        progress = None
        if runtime.is_main:
            from tqdm.auto import tqdm

            progress = self.progress = tqdm(
                total=self.total_steps, initial=self.start_step, desc="training", dynamic_ncols=True
            )
        window = ThroughputWindow()
        batches, batches_epoch = None, -1
        for step in range(self.start_step + 1, self.total_steps + 1):
            epoch, index = divmod(step - 1, self.plan.steps_per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = self.plan.global_batches(epoch), epoch
            global_batch = batches[index]
            # e.g. 2 ranks x accum 2, 1,000 target tokens in the global batch: each micro-batch's
            # token-loss sum is scaled by 4 / 1,000 (the stepper then averages over 4)
            scale = self.loss_multiplier / self.plan.target_tokens(global_batch)
            loss_sum_local = torch.zeros((), device=accel.device, dtype=torch.float64)
            real = slots = 0
            micro_batches = self.plan.rank_micro_batches(global_batch)
            for micro_index, (indices, is_padding) in enumerate(micro_batches):
                batch = self.data.collate(indices, self.data.train, accel.device)
                is_last = micro_index == len(micro_batches) - 1
                with self.stepper.micro_step(is_last):
                    loss_sum = token_loss_sum(self.model, batch, runtime.kind)
                    # a padding micro-batch (equal micro-steps on every rank) weighs nothing
                    self.stepper.backward(loss_sum * (0.0 if is_padding else scale), is_last)
                if is_padding:
                    continue
                loss_sum_local += loss_sum.detach().double()
                batch_real, batch_slots = data_lib.batch_token_stats(batch)
                real, slots = real + batch_real, slots + batch_slots
            grad_norm = self.stepper.optimizer_step()
            # one small all-reduce per step: loss, token counts and the stop flag together
            stats = torch.tensor(
                [float(loss_sum_local), real, slots, float(self.stop_flag.is_set)],
                device=accel.device,
                dtype=torch.float64,
            )
            stats = accel.reduce(stats, reduction="sum")
            loss = float(stats[0]) / self.plan.target_tokens(global_batch)
            window.tokens += float(stats[1])
            window.slots += float(stats[2])
            window.samples += train_cfg.global_batch_size
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
            eval_loss = None
            every_eval = train_cfg.eval_every_steps
            if every_eval and step % every_eval == 0 and step != self.total_steps:
                eval_loss = self.evaluate()
            if (
                step % train_cfg.log_every_steps == 0
                or step == self.total_steps
                or eval_loss is not None
            ):
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    **window.rates(),
                    "peak_memory_gib": peak_memory_gib(),
                }
                if eval_loss is not None:
                    record.update(eval_loss=eval_loss, **self.eval_by_source)
                self._write_record(record, progress)
                window = ThroughputWindow()
            stop_requested = float(stats[3]) > 0
            every = cfg.checkpoint.every_steps
            if (every and step % every == 0 and step != self.total_steps) or stop_requested:
                self.save_checkpoint(step)
            if stop_requested:
                if progress is not None:
                    progress.close()
                raise StopForRequeue(step, self.stop_flag.received)
        if progress is not None:
            progress.close()
        final_eval = self.evaluate()
        if final_eval is not None:
            before = self.initial_eval_loss
            runtime.log(
                f"eval loss after training: {final_eval:.4f}"
                + (f" (before: {before:.4f})" if before is not None else "")
            )
            self.metrics.write(
                {
                    "step": self.total_steps,
                    "eval_loss": final_eval,
                    **self.eval_by_source,
                    "final": True,
                }
            )

    def _write_record(self, record: dict[str, Any], progress: Any) -> None:
        self.metrics.write(record)
        if self.cfg.train.report_to:
            self.accelerator.log(record, step=record["step"])
        if progress is not None:  # main process only
            progress.write(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )

    def save_checkpoint(self, step: int) -> None:
        """Collective: every rank writes its part (ZeRO partitions, RNG state)."""
        start = time.perf_counter()
        state = {
            "step": step,
            "world_size": self.runtime.world_size,
            "fingerprint": fingerprint(self.cfg, self.identity),
            "total_steps": self.total_steps,
            "schedule": schedule_record(self.cfg),
        }
        path = self.checkpointer.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            engine=self.runtime.engine,
            trainer_state=state,
        )
        self.runtime.log(f"checkpoint saved: {path} ({time.perf_counter() - start:.2f} s)")

    # ------------------------------------------------------------------ outputs
    def save_final(self) -> Path:
        """final/: HF-loadable model (or verified LoRA adapter) + tokenizer, written atomically.
        Collective: under ZeRO-3 every rank takes part in gathering the 16-bit weights."""
        from clustertune.export import write_final

        marker = {
            "step": self.total_steps,
            "fingerprint": fingerprint(self.cfg, self.identity),
            "schedule": schedule_record(self.cfg),
            "peft_method": self.cfg.peft.method,
            "base_model": self.cfg.model.name_or_path,
            "kind": self.runtime.kind,
            # what evaluation (run_dir) takes from the run: what final/ was trained with
            **final_prompt_settings(
                self.cfg, self.data.template.date if self.data.template else None
            ),
        }
        merge = self.cfg.peft.method == "lora" and self.cfg.peft.merge_on_save
        return write_final(
            self.run,
            self.accelerator,
            self.model,
            self.tokenizer,
            marker,
            merge=merge,
            rerun_hint=self._rerun_hint,
        )

    def cleanup(self) -> None:
        if self.runtime.is_main:
            plot_training(self.metrics.records(), self.run.curves)
        if self.cfg.train.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        self.runtime.shutdown()
