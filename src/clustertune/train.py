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

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clustertune import data as data_lib
from clustertune.atomicio import write_json_atomic
from clustertune.autobatch import (
    Prober,
    SearchResult,
    cache_key,
    cached_search,
    choose_micro_batch,
    device_description,
    to_json,
)
from clustertune.checkpoint import TRAINER_STATE, Checkpointer, latest_checkpoint
from clustertune.config import FinetuneConfig, config_to_yaml, write_resolved_config
from clustertune.distributed import (
    DDPStepper,
    DeepSpeedStepper,
    all_ranks_agree,
    build_accelerator,
    deepspeed_config_path,
    fill_deepspeed_config,
    fill_hidden_size_autos,
    init_process_state,
    launched_world_size,
    load_deepspeed_json,
    offloads_optimizer,
    zero_stage,
)
from clustertune.errors import UserError
from clustertune.metrics import MetricsLog, peak_memory_gib, plot_training
from clustertune.modeling import (
    build_model,
    count_parameters,
    load_model_config,
    load_tokenizer,
    model_kind,
    resolve_dtype,
)
from clustertune.sampler import (
    BATCH_PLAN_VERSION,
    GlobalBatchPlan,
    check_batch_arithmetic,
    derive_grad_accum_steps,
    eval_micro_batches,
)
from clustertune.stop import StopFlag, StopForRequeue

FINAL_MARKER = "clustertune_final.json"

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


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fingerprint(cfg: FinetuneConfig) -> dict[str, Any]:
    # The data order also depends on the batch-plan code: its version is part of the identity.
    return {
        **{key: _get(cfg, key) for key in FINGERPRINT_KEYS},
        "batch_plan_version": BATCH_PLAN_VERSION,
    }


class WarmupDecay:
    """LR multiplier: linear warmup to 1, then linear/cosine decay to 0 at total_steps."""

    def __init__(self, warmup_steps: int, total_steps: int, kind: str) -> None:
        self.warmup_steps, self.total_steps, self.kind = warmup_steps, total_steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(progress, 1.0)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def build_optimizer(
    model: torch.nn.Module, t: Any, ds_config: dict | None
) -> torch.optim.Optimizer:
    """AdamW without decay on biases and norms; DeepSpeed's CPU Adam under ZeRO-Offload."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if "bias" in name or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # ZeRO drops empty groups (LoRA has no norms)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload wants its CPU Adam

        return DeepSpeedCPUAdam(
            groups,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            adamw_mode=True,
        )
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )


def check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"output_dir '{output_dir}' is not writable ({error.strerror}); choose a folder you can write to."
        ) from None


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Sum (not mean) of per-token cross-entropy over the batch's target tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    if kind == "causal":  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=data_lib.IGNORE_INDEX,
        reduction="sum",
    )


class Trainer:
    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> bool:
        """Build everything; return False when the run already finished (nothing to do)."""
        cfg = self.cfg
        self._validate_before_compute()
        self.state = init_process_state(use_deepspeed=self.ds_raw is not None)
        if self.state.num_processes != self.world_size:
            raise RuntimeError(
                f"accelerate sees {self.state.num_processes} processes, the launcher {self.world_size}"
            )
        self.is_main = self.state.is_main_process
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self._load_data()
        steps_per_epoch = len(self.train_data) // cfg.train.global_batch_size
        self.total_steps = (
            cfg.train.max_steps
            if cfg.train.max_steps > 0
            else cfg.train.num_epochs * steps_per_epoch
        )
        if self._already_finished():
            return False
        resume_from = self._resume_path()
        if resume_from is not None:
            self._check_resumable(resume_from)
        self.auto_batch = self._auto_micro_batch() if cfg.train.micro_batch_size == "auto" else None
        self.micro_batch_size = (
            self.auto_batch.chosen if self.auto_batch else cfg.train.micro_batch_size
        )
        self.grad_accum_steps = derive_grad_accum_steps(
            cfg.train.global_batch_size, self.micro_batch_size, self.world_size
        )
        self.ds_config = (
            None
            if self.ds_raw is None
            else fill_deepspeed_config(
                self.ds_raw,
                micro_batch_size=self.micro_batch_size,
                grad_accum_steps=self.grad_accum_steps,
                world_size=self.world_size,
                max_grad_norm=cfg.train.max_grad_norm,
                dtype=self.dtype,
            )
        )
        self.accelerator = build_accelerator(
            ds_config=self.ds_config,
            dtype=self.dtype,
            project_dir=str(self.output_dir),
            report_to=cfg.train.report_to,
        )
        self.checkpointer = Checkpointer(
            self.output_dir, self.accelerator, cfg.checkpoint.keep_last
        )
        self.plan = GlobalBatchPlan(
            source_lengths=np.asarray(self.train_data["num_source_tokens"]),
            target_lengths=np.asarray(self.train_data["num_target_tokens"]),
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            world_size=self.world_size,
            rank=self.state.process_index,
            seed=cfg.seed,
            length_group_size=cfg.data.length_group_size,
        )
        if self.is_main:
            write_resolved_config(
                cfg, self.output_dir / "config.yaml", header=self._config_header()
            )
        self._setup_model()
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.start_step = 0
        if resume_from is not None:
            self._resume(resume_from)
        elif self.is_main:
            self.metrics.truncate_after(-1)  # a fresh run: a fresh metrics file
        if self.auto_batch is not None:
            self.metrics.write(
                {"step": self.start_step, "event": "auto_batch", **to_json(self.auto_batch)}
            )
        if cfg.train.report_to:
            self.accelerator.init_trackers("clustertune", config=_flat_config(cfg))
        self.stop_flag = StopFlag()
        self.stop_flag.install()
        return True

    def _validate_before_compute(self) -> None:
        """Every user mistake we can see without a process group is raised here."""
        cfg = self.cfg
        self.world_size = launched_world_size()
        if isinstance(cfg.train.micro_batch_size, str) and cfg.train.micro_batch_size != "auto":
            raise UserError(
                f"train.micro_batch_size={cfg.train.micro_batch_size!r} must be a number or auto."
            )
        check_batch_arithmetic(
            cfg.train.global_batch_size, cfg.train.micro_batch_size, self.world_size
        )
        if cfg.train.lr_schedule not in ("linear", "cosine", "constant"):
            raise UserError(
                f"train.lr_schedule={cfg.train.lr_schedule!r} is not one of linear, cosine, constant."
            )
        if cfg.peft.method not in ("none", "lora"):
            raise UserError(f"peft.method={cfg.peft.method!r} is not one of none, lora.")
        if cfg.train.max_steps <= 0 and cfg.train.num_epochs <= 0:
            raise UserError("set train.max_steps or train.num_epochs to a positive number.")
        if (
            cfg.resume not in ("auto", "never")
            and not (Path(cfg.resume) / "COMPLETE.json").is_file()
        ):
            raise UserError(
                f"resume='{cfg.resume}' is not a complete checkpoint folder; use auto, never, or a checkpoints/step_N path."
            )
        if cfg.data.source_column not in data_lib.template_fields(cfg.data.prompt_template):
            raise UserError(
                f"data.prompt_template has no {{{cfg.data.source_column}}} placeholder for "
                f"data.source_column='{cfg.data.source_column}'; add it to the template."
            )
        if not (cfg.data.train_file or cfg.data.dataset):
            raise UserError(
                "no training data: set data.train_file (a file or hub id) or data.dataset."
            )
        check_output_dir(self.output_dir)
        if cfg.resume == "never" and (
            (self.output_dir / "checkpoints").is_dir() or (self.output_dir / "final").is_dir()
        ):
            raise UserError(
                f"output_dir '{self.output_dir}' already holds a run and resume=never would overwrite it; "
                "use another output_dir or resume=auto."
            )
        self.model_config = load_model_config(cfg.model.name_or_path)
        self.kind = model_kind(self.model_config)
        self.dtype = resolve_dtype(cfg.model.dtype, self.model_config)
        ds_path = deepspeed_config_path()
        # "auto" entries stay until the micro-batch size is known (auto batch sizing)
        self.ds_raw = load_deepspeed_json(ds_path) if ds_path else None
        if self.ds_raw is not None:  # reject a config no setting can complete, before any compute
            fill_deepspeed_config(
                self.ds_raw,
                micro_batch_size=1,
                grad_accum_steps=1,
                world_size=self.world_size,
                max_grad_norm=cfg.train.max_grad_norm,
                dtype=self.dtype,
            )
        self.is_deepspeed = self.ds_raw is not None

    def _load_data(self) -> None:
        cfg, state = self.cfg, self.state
        d = cfg.data
        required = [*data_lib.template_fields(d.prompt_template), d.target_column]
        spec = data_lib.TokenizeSpec(
            self.kind, d.prompt_template, d.target_column, d.max_source_length, d.max_target_length
        )
        train_source = d.train_file or d.dataset
        eval_source = d.eval_file or (d.dataset if d.dataset and not d.train_file else None)
        with state.main_process_first():  # rank 0 tokenises and caches; the others read the cache
            train = data_lib.load_split(
                train_source,
                split=d.train_split,
                required_columns=required,
                what="data.train_file" if d.train_file else "data.dataset",
            )
            self.train_data = data_lib.tokenize_dataset(train, self.tokenizer, spec, d.num_proc)
            self.eval_data = None
            if eval_source:
                evaluation = data_lib.load_split(
                    eval_source,
                    split=d.eval_split,
                    required_columns=required,
                    what="data.eval_file" if d.eval_file else "data.dataset",
                )
                if d.max_eval_examples:
                    evaluation = evaluation.select(range(min(d.max_eval_examples, len(evaluation))))
                self.eval_data = data_lib.tokenize_dataset(
                    evaluation, self.tokenizer, spec, d.num_proc
                )
        if len(self.train_data) < cfg.train.global_batch_size:
            raise UserError(
                f"the training data has {len(self.train_data)} examples, fewer than "
                f"train.global_batch_size={cfg.train.global_batch_size}; lower the global batch size."
            )
        if self.is_main:
            print(data_lib.truncation_report(self.train_data, "train", spec), flush=True)
            if self.eval_data is not None:
                print(data_lib.truncation_report(self.eval_data, "eval", spec), flush=True)
        decoder_start = (
            getattr(self.model_config, "decoder_start_token_id", None)
            if self.kind == "seq2seq"
            else None
        )
        if self.kind == "seq2seq" and decoder_start is None:
            decoder_start = self.tokenizer.pad_token_id
        self.collator = data_lib.Collator(self.tokenizer.pad_token_id, decoder_start)

    # ------------------------------------------------------------------ auto batch size
    def _auto_micro_batch(self) -> SearchResult:
        cfg, state = self.cfg, self.state
        worst = {
            "source_tokens": int(max(self.train_data["num_source_tokens"])),
            "target_tokens": int(max(self.train_data["num_target_tokens"])),
        }
        key = cache_key(
            device=device_description(),
            model=cfg.model.name_or_path,
            model_config=self.model_config.to_json_string(),
            worst_case=worst,
            dtype=self.dtype,
            peft=dataclasses.asdict(cfg.peft),
            deepspeed=self.ds_raw,
            world_size=self.world_size,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            kind=self.kind,
        )
        prober = Prober(
            self._build_probe, self._worst_case_batch(worst), state.process_index, all_ranks_agree
        )
        # the upper bound: one rank's share of the global batch (accumulation 1)
        largest, probes, seconds, was_cached = cached_search(
            prober,
            cfg.train.global_batch_size // self.world_size,
            self.output_dir / "auto_batch.json",
            key,
            self.is_main,
        )
        chosen, note = choose_micro_batch(
            largest, cfg.train.global_batch_size, self.world_size, cfg.train.auto_batch_margin
        )
        result = SearchResult(
            largest_fitting=largest,
            chosen=chosen,
            grad_accum_steps=cfg.train.global_batch_size // (chosen * self.world_size),
            probes=probes,
            worst_case_shape=worst,
            seconds=seconds,
            cached=was_cached,
            note=note,
        )
        if self.is_main:
            how = "from cache" if was_cached else f"searched {len(probes)} sizes in {seconds:.1f} s"
            print(
                f"auto micro-batch: largest fitting {largest}, chosen {chosen} "
                f"(margin {cfg.train.auto_batch_margin:.0%}), grad_accum_steps {result.grad_accum_steps} for "
                f"global_batch_size {cfg.train.global_batch_size}; {how}"
                + (f"; {note}" if note else ""),
                flush=True,
            )
        return result

    def _worst_case_batch(self, worst: dict[str, int]) -> Callable[[int], dict[str, torch.Tensor]]:
        """m copies of the longest source with the longest target: the largest batch the
        pipeline can ever produce for micro-batch m."""
        vocab = len(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        generator = torch.Generator().manual_seed(0)
        source = torch.randint(3, vocab, (worst["source_tokens"],), generator=generator).tolist()
        target = torch.randint(3, vocab, (worst["target_tokens"],), generator=generator).tolist()
        source[-1] = target[-1] = eos
        if self.kind == "causal":
            example = {
                "input_ids": source + target,
                "labels": [data_lib.IGNORE_INDEX] * len(source) + target,
            }
        else:
            example = {"input_ids": source, "labels": target}

        def make(micro_batch_size: int) -> dict[str, torch.Tensor]:
            batch = self.collator([example] * micro_batch_size)
            return {k: v.to(self.state.device) for k, v in batch.items()}

        return make

    def _build_probe(self, micro_batch_size: int) -> tuple[Callable, Callable, Callable]:
        """A fresh model + optimizer (+ DeepSpeed engine for this micro-batch) to probe with."""
        cfg = self.cfg
        model = build_model(cfg.model, cfg.peft, self.model_config)
        optimizer = build_optimizer(model, cfg.train, self.ds_raw)
        if self.ds_raw is not None:
            import deepspeed

            ds_config = fill_deepspeed_config(
                self.ds_raw,
                micro_batch_size=micro_batch_size,
                grad_accum_steps=1,
                world_size=self.world_size,
                max_grad_norm=cfg.train.max_grad_norm,
                dtype=self.dtype,
            )
            ds_config = fill_hidden_size_autos(ds_config, self.model_config)
            ds_config["zero_allow_untested_optimizer"] = True
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

            def forward_backward(batch: dict[str, torch.Tensor]) -> None:
                engine.backward(token_loss_sum(engine, batch, self.kind) / batch["labels"].numel())

            return forward_backward, engine.step, engine.destroy
        model.to(self.state.device)

        def local_forward_backward(batch: dict[str, torch.Tensor]) -> None:
            # No DDP wrapper here: the probe stays free of collectives, so a rank that runs out
            # of memory cannot leave the others waiting inside an all-reduce.
            (token_loss_sum(model, batch, self.kind) / batch["labels"].numel()).backward()

        return local_forward_backward, optimizer.step, lambda: None

    def _already_finished(self) -> bool:
        marker = self.output_dir / "final" / FINAL_MARKER
        if self.cfg.resume == "never" or not marker.is_file():
            return False
        finished = json.loads(marker.read_text())
        if finished.get("step") == self.total_steps and finished.get("fingerprint") == _jsonable(
            fingerprint(self.cfg)
        ):
            if self.is_main:
                print(
                    f"clustertune: {self.output_dir} already finished at step {self.total_steps} "
                    f"(final/ is complete); nothing to do.",
                    flush=True,
                )
            return True
        return False

    def _resume_path(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return latest_checkpoint(self.output_dir)
        return Path(self.cfg.resume)

    def _setup_model(self) -> None:
        cfg, accel = self.cfg, self.accelerator
        model = build_model(cfg.model, cfg.peft, self.model_config)
        trainable, total = count_parameters(model)
        if self.is_main:
            print(
                f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%), "
                f"{self.kind}, {cfg.peft.method}, dtype {self.dtype}, "
                f"{'ZeRO-' + str(zero_stage(self.ds_config)) if self.is_deepspeed else 'DDP' if self.world_size > 1 else 'single process'}",
                flush=True,
            )
        t = cfg.train
        optimizer = build_optimizer(model, t, self.ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(t.warmup_steps, self.total_steps, t.lr_schedule)
        )
        # The schedule stays a plain LambdaLR that we step once per optimizer step in both
        # paths (accelerate's wrapper would step it num_processes times per call).
        if self.is_deepspeed:
            model, optimizer = accel.prepare(model, optimizer)  # model is now the DeepSpeed engine
            self.stepper = DeepSpeedStepper(model, scheduler)
        else:
            model, optimizer = accel.prepare(model, optimizer)
            self.stepper = DDPStepper(accel, model, optimizer, scheduler, t.max_grad_norm)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_multiplier = self.stepper.loss_multiplier(self.world_size, self.grad_accum_steps)

    def _check_resumable(self, path: Path) -> None:
        """Refuse a checkpoint made with other settings before any weights are loaded."""
        state = json.loads((path / TRAINER_STATE).read_text())
        saved, now = state["fingerprint"], _jsonable(fingerprint(self.cfg))
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed and not self.cfg.allow_config_change:
            raise UserError(
                f"the checkpoint in {path} was made with different settings "
                f"({'; '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in changed)}); "
                "use a new output_dir, or allow_config_change=true to resume anyway."
            )
        if self.is_deepspeed and state["world_size"] != self.world_size:
            raise UserError(
                f"the checkpoint in {path} holds ZeRO partitions for {state['world_size']} ranks, this launch has "
                f"{self.world_size}; resume with {state['world_size']} processes or start a new output_dir."
            )

    def _resume(self, path: Path) -> None:
        start = time.perf_counter()
        state = self.checkpointer.load(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            is_deepspeed=self.is_deepspeed,
        )
        self.start_step = state["step"]
        self.metrics.truncate_after(self.start_step)
        if self.is_main:
            print(
                f"resumed from {path} at step {self.start_step} of {self.total_steps} "
                f"(loaded in {time.perf_counter() - start:.2f} s)",
                flush=True,
            )

    def _config_header(self) -> str:
        return (
            f"# Resolved config of this run (the single source of truth); rerun with:\n"
            f"#   accelerate launch --config_file <launch.yaml> recipes/finetune.py --config {self.output_dir / 'config.yaml'}\n"
        )

    # ------------------------------------------------------------------ train
    def _to_device(self, indices: np.ndarray, source: Any) -> dict[str, torch.Tensor]:
        rows = source[[int(i) for i in indices]]
        examples = [
            {"input_ids": a, "labels": b}
            for a, b in zip(rows["input_ids"], rows["labels"], strict=True)
        ]
        return {k: v.to(self.accelerator.device) for k, v in self.collator(examples).items()}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Exact mean token loss over the eval set. Every rank runs the same number of
        forwards (ZeRO-3 gathers parameters collectively in each one)."""
        if self.eval_data is None:
            return None
        accel = self.accelerator
        self.model.eval()
        lengths = np.asarray(self.eval_data["num_source_tokens"]) + np.asarray(
            self.eval_data["num_target_tokens"]
        )
        totals = torch.zeros(2, device=accel.device, dtype=torch.float64)
        for indices, counts in eval_micro_batches(
            lengths, self.micro_batch_size, self.world_size, accel.process_index
        ):
            batch = self._to_device(indices, self.eval_data)
            loss_sum = token_loss_sum(self.model, batch, self.kind)
            if counts:
                totals[0] += loss_sum.double()
                totals[1] += (batch["labels"] != data_lib.IGNORE_INDEX).sum()
        totals = accel.reduce(totals, reduction="sum")
        self.model.train()
        return float(totals[0] / totals[1])

    def train(self) -> None:
        cfg, accel = self.cfg, self.accelerator
        t = cfg.train
        if self.start_step == 0:
            initial = self.evaluate()
            if initial is not None:
                self._log_main(f"eval loss before training: {initial:.4f}")
                self.metrics.write({"step": 0, "eval_loss": initial})
                self.initial_eval_loss = initial
        self.model.train()
        progress = None
        if self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=self.total_steps, initial=self.start_step, desc="training", dynamic_ncols=True
            )
        interval = {"tokens": 0.0, "slots": 0.0, "samples": 0, "start": time.perf_counter()}
        batches, batches_epoch = None, -1
        for step in range(self.start_step + 1, self.total_steps + 1):
            epoch, index = divmod(step - 1, self.plan.steps_per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = self.plan.global_batches(epoch), epoch
            global_batch = batches[index]
            scale = self.loss_multiplier / self.plan.target_tokens(global_batch)
            loss_sum_local = torch.zeros((), device=accel.device, dtype=torch.float64)
            real = slots = 0
            micro_batches = self.plan.micro_batches(global_batch)
            for a, indices in enumerate(micro_batches):
                batch = self._to_device(indices, self.train_data)
                is_last = a == len(micro_batches) - 1
                with self.stepper.micro_step(is_last):
                    loss_sum = token_loss_sum(self.model, batch, self.kind)
                    self.stepper.backward(loss_sum * scale, is_last)
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
            interval["tokens"] += float(stats[1])
            interval["slots"] += float(stats[2])
            interval["samples"] += t.global_batch_size
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
            eval_loss = None
            if t.eval_every_steps and step % t.eval_every_steps == 0 and step != self.total_steps:
                eval_loss = self.evaluate()
            if step % t.log_every_steps == 0 or step == self.total_steps or eval_loss is not None:
                elapsed = time.perf_counter() - interval["start"]
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_second": interval["tokens"] / elapsed,
                    "samples_per_second": interval["samples"] / elapsed,
                    "padding_efficiency": interval["tokens"] / max(1.0, interval["slots"]),
                    "peak_memory_gib": peak_memory_gib(),
                }
                if eval_loss is not None:
                    record["eval_loss"] = eval_loss
                self.metrics.write(record)
                if t.report_to:
                    accel.log(record, step=step)
                if self.is_main and progress is not None:
                    progress.write(
                        " ".join(
                            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()
                        )
                    )
                interval = {"tokens": 0.0, "slots": 0.0, "samples": 0, "start": time.perf_counter()}
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
        self.final_step = self.total_steps
        final_eval = self.evaluate()
        if final_eval is not None:
            self._log_main(
                f"eval loss after training: {final_eval:.4f}"
                + (
                    f" (before: {self.initial_eval_loss:.4f})"
                    if hasattr(self, "initial_eval_loss")
                    else ""
                )
            )
            self.metrics.write({"step": self.total_steps, "eval_loss": final_eval, "final": True})

    def save_checkpoint(self, step: int) -> None:
        start = time.perf_counter()
        state = {
            "step": step,
            "world_size": self.world_size,
            "fingerprint": _jsonable(fingerprint(self.cfg)),
            "total_steps": self.total_steps,
        }
        path = self.checkpointer.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            is_deepspeed=self.is_deepspeed,
            trainer_state=state,
        )
        self._log_main(f"checkpoint saved: {path} ({time.perf_counter() - start:.2f} s)")

    # ------------------------------------------------------------------ outputs
    def save_final(self) -> Path:
        """final/: HF-loadable model (or verified LoRA adapter) + tokenizer, written atomically."""
        from clustertune.export import save_pretrained_verified

        accel = self.accelerator
        final, tmp = self.output_dir / "final", self.output_dir / ".final.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accel.wait_for_everyone()
        # Collective: under ZeRO-3 every rank takes part in gathering the 16-bit weights.
        state_dict = accel.get_state_dict(self.model)
        if self.is_main:
            unwrapped = accel.unwrap_model(self.model)
            # gradient checkpointing turned the KV cache off for training; generation wants it
            unwrapped.config.use_cache = True
            save_pretrained_verified(unwrapped, state_dict, tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json_atomic(
                tmp / FINAL_MARKER,
                {
                    "step": self.final_step,
                    "fingerprint": _jsonable(fingerprint(self.cfg)),
                    "peft_method": self.cfg.peft.method,
                    "base_model": self.cfg.model.name_or_path,
                    "kind": self.kind,
                    "prompt_template": self.cfg.data.prompt_template,
                },
            )
            old = self.output_dir / ".final.old"
            if final.exists():  # never lose a previous final/ until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            if self.cfg.peft.method == "lora" and self.cfg.peft.merge_on_save:
                from clustertune.export import merge_adapter

                merge_adapter(final, final / "merged")
            print(f"final model written to {final}", flush=True)
        accel.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        if self.is_main:
            plot_training(self.metrics.records(), self.output_dir / "training_curves.png")
        if self.cfg.train.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()

    def _log_main(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _flat_config(cfg: FinetuneConfig) -> dict[str, Any]:
    import yaml

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(yaml.safe_load(config_to_yaml(cfg)), "")
    return flat
