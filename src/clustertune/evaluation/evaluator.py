"""The `Evaluator`: one evaluation run, set up, generated, scored and saved on 1 to N ranks.

Lifecycle (like the Trainer): Evaluator(cfg).setup() -> generate() -> save() -> cleanup().

- `setup`: resolve the config (config.py), build the accelerator (DDP, or DeepSpeed with
  ZeRO-1/2 run as stage 0 and ZeRO-3 partitioned), load the tokenizer and the eval set
  (evalset.py), then the model (`_setup_model`; a LoRA adapter merged by
  `_load_merged_adapter`; model.adapter_paths: all loaded beside one base, adapters.py), the
  systems to evaluate (one; or one per adapter, plus the base) and, for `batch_size: auto`,
  the batch size (`_auto_batch_size`, once for all systems); only then, every check passed,
  the resolved config.yaml (and each system's own, in its folder).
- `generate`: for each system (its adapter switched on), every rank generates its batches
  (`_generate_system`; `deal_to_ranks`; under ZeRO-3 with `synced_gpus=True`, since each
  forward gathers parameters collectively and a rank that stopped early would hang the
  others); the (id, text) records are gathered to all ranks.
- `save`: the main process scores and writes rouge.json and predictions.jsonl per system
  (`_save_system`, report.py), and with several systems their comparison.
- `cleanup`: every rank waits until the main process is done.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clustertune import rouge
from clustertune.autobatch import (
    Prober,
    ProbeSteps,
    SearchResult,
    cache_key,
    cached_search,
    device_description,
    margin_applied,
)
from clustertune.chat import replies
from clustertune.config import ModelConfig, PeftConfig
from clustertune.deepspeed_config import zero_stage
from clustertune.distributed import all_ranks_agree
from clustertune.errors import UserError
from clustertune.evaluation.adapters import (
    System,
    adapter_load_error,
    adapter_ranks,
    adapter_systems,
    load_adapters,
    probe_system,
    single_system,
    write_comparison,
)
from clustertune.evaluation.config import EvaluateConfig, generate_kwargs, resolve_config
from clustertune.evaluation.evalset import (
    EvalSet,
    count_generated,
    load_eval_set,
    make_batches,
    merge_predictions,
    pad_prompts,
    until_stop,
)
from clustertune.evaluation.prompts import stop_token_ids
from clustertune.evaluation.report import build_report, write_outputs
from clustertune.fsdp import shard_model
from clustertune.modeling import build_model, load_tokenizer, zero3_init_disabled
from clustertune.run_folder import CONFIG_FILE, EvalFolder
from clustertune.runtime import Runtime, strategy_label
from clustertune.sampler import deal_to_ranks


class Evaluator:
    """One evaluation run on every rank: setup() -> generate() -> save() -> cleanup()."""

    # ------------------------------------------------------------ set in __init__
    cfg: EvaluateConfig  # resolved by setup() (run_dir, adapter base, defaults)
    output_dir: Path
    # ------------------------------------------------------------ set in setup()
    runtime: Runtime  # world size, model config, kind, dtype, process group (runtime.py)
    ds_config: dict | None  # filled DeepSpeed JSON (ZeRO-1/2 become stage 0); None: DDP
    zero3: bool  # ZeRO-3: DeepSpeed partitions the parameters
    # parameters partitioned (ZeRO-3 or FSDP2): every rank must make the same generate calls
    sharded: bool
    strategy: str  # for logs and rouge.json, e.g. "ZeRO-3" or "DDP"
    accelerator: Any
    tokenizer: Any
    eval_set: EvalSet
    model: Any  # prepared (the DeepSpeed engine under ZeRO-3)
    generator: Any  # the unwrapped model whose generate() is called
    stop_ids: list[int]  # generation ends at any of them: end-of-turn (chat template), EOS
    systems: list[System]  # what is evaluated: one, or each adapter (and the base) of the job
    auto_batch: SearchResult | None  # the search trace when batch_size is auto
    batch_size: int
    # generate() sets each system's predictions (in eval-set order) and throughput

    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    @property
    def kind(self) -> str:
        return self.runtime.kind

    @property
    def dtype(self) -> str:
        return self.runtime.dtype

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        self.cfg, notes = resolve_config(self.cfg)
        cfg = self.cfg
        self.runtime = runtime = Runtime.resolve(
            model_name=cfg.model.name_or_path,
            requested_dtype=cfg.model.dtype,
            output_dir=self.output_dir,
        )
        # Inference has no accumulation and no clipping: micro batch = batch_size, accum 1.
        self.ds_config = runtime.deepspeed_config(
            micro_batch_size=1 if cfg.batch_size == "auto" else cfg.batch_size,
            grad_accum_steps=1,
            max_grad_norm=1.0,
        )
        if self.ds_config is not None:
            # Inference builds no optimizer: an optimizer / scheduler block of a training
            # JSON (and its "auto"s, which only training fills) does not apply.
            self.ds_config.pop("optimizer", None)
            self.ds_config.pop("scheduler", None)
        self.zero3 = zero_stage(self.ds_config) == 3
        self.sharded = self.zero3 or runtime.fsdp is not None
        self.strategy = strategy_label(self.ds_config, runtime.world_size, runtime.fsdp)
        if self.ds_config is not None and not self.zero3:
            # ZeRO-1/2 shard optimizer states and gradients, which inference has none of
            # (DeepSpeed refuses stage 1/2 without an optimizer); the weights are replicated
            # either way, so the engine is built as stage 0.
            self.ds_config["zero_optimization"] = {"stage": 0}
            self.strategy += " (weights replicated: stage 0 for inference)"
        runtime.start(cfg.seed)
        self.accelerator = runtime.make_accelerator(self.ds_config, report_to=[])
        for note in notes:
            runtime.log(f"note: {note}")
        # The tokenizer training saved (run_dir: final/'s), with the chat template it trained with.
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
        with runtime.main_process_first():  # rank 0 tokenises and caches; the others read it
            self.eval_set = load_eval_set(
                cfg.data,
                self.tokenizer,
                self.kind,
                cfg.model.name_or_path,
                cfg.generation.enable_thinking,
            )
        if self.eval_set.examples is not None:  # chat: replies are read back into their parts
            runtime.log(f"replies parsed by {replies.install_parser(self.tokenizer)}")
        eval_set, references = self.eval_set, cfg.data.reference_columns
        truncated = (
            ""
            if eval_set.style.format == "chat"
            else f", {eval_set.num_truncated} prompts truncated to {cfg.data.max_source_length} tokens"
        )
        runtime.log(
            f"eval: {len(eval_set.ids)} examples from {cfg.data.eval_file or cfg.data.dataset} "
            f"(ids: {eval_set.id_source}), references: "
            f"{f'{len(references)} column(s)' if references else 'the last assistant turn'}, "
            f"prompts: {eval_set.style.describe()}{truncated}"
        )
        self._setup_model()
        self.stop_ids = stop_token_ids(
            self.tokenizer, eval_set.style, self.generator.generation_config.eos_token_id
        )
        self.systems = (
            adapter_systems(cfg, self.output_dir, self.generator)
            if self.multi
            else [single_system(cfg, self.output_dir)]
        )
        self.auto_batch = None
        if cfg.batch_size == "auto":
            probe = probe_system(self.systems, self.generator) if self.multi else self.systems[0]
            with probe.activate():
                self.auto_batch = self._auto_batch_size()
            self.batch_size = self.auto_batch.chosen
        else:
            self.batch_size = cfg.batch_size
        # Last: a config that failed any check above (a bad reference column, a model that
        # does not load) leaves no config.yaml claiming an evaluation that never ran.
        runtime.write_resolved_config(cfg, CONFIG_FILE, header=self._config_header())
        if self.multi:  # each system's folder: the config that evaluates it alone
            for system in self.systems:
                runtime.write_resolved_config(
                    system.cfg,
                    f"{system.name}/{CONFIG_FILE}",
                    header=self._config_header(system.output_dir, f" ({system.name} alone)"),
                )

    @property
    def multi(self) -> bool:
        """model.adapter_paths: one job, several systems, each in its own folder."""
        return self.cfg.model.adapter_paths is not None

    def _setup_model(self) -> None:
        cfg, accel, adapters = self.cfg, self.accelerator, self.cfg.model.adapter_paths
        # With adapters the base is loaded whole (not partitioned by zero.Init) so that they
        # can be loaded (and one merged); deepspeed.initialize partitions it afterwards.
        whole = cfg.model.adapter_path or adapters
        loading = zero3_init_disabled() if whole else contextlib.nullcontext()
        with loading:
            model = build_model(
                ModelConfig(name_or_path=cfg.model.name_or_path, dtype=cfg.model.dtype),
                PeftConfig(method="none"),
                self.runtime.model_config,
            )
        if cfg.model.adapter_path:
            model = _load_merged_adapter(model, cfg.model.adapter_path, cfg.model.name_or_path)
        elif adapters:
            names = cfg.model.adapter_names or []
            model = load_adapters(model, adapters, names, cfg.model.name_or_path)
        model.eval().requires_grad_(False)
        if self.ds_config is not None:
            # ZeRO-3: the engine partitions the weights; its forward hooks gather them per layer.
            self.model = accel.prepare(model)
        elif self.runtime.fsdp is not None:
            # FSDP2: each block's weights gathered for its forward and freed after, as in
            # training; generation keeps every rank stepping together (synced_gpus)
            self.model = shard_model(model, self.runtime.fsdp, self.dtype)
        else:
            # DDP: one replica per rank and nothing to all-reduce, so no DDP wrapper (which also
            # refuses a model without trainable parameters): device placement and autocast only.
            self.model = accel.prepare_model(model, evaluation_mode=True)
        self.generator = accel.unwrap_model(self.model)
        self.generator.eval()
        loaded = (
            f" + adapter {cfg.model.adapter_path} (merged)"
            if cfg.model.adapter_path
            else f" + {len(adapters)} adapter(s) {', '.join(cfg.model.adapter_names or [])} "
            "(switched, not merged)"
            if adapters
            else ""
        )
        self.runtime.log(
            f"model: {cfg.model.name_or_path}{loaded}, {self.kind}, dtype {self.dtype}, {self.strategy}, {self.world_size} process(es)"
        )

    @property
    def padding_side(self) -> str:
        """Decoder-only models continue from the last position: left; encoder-decoders: right."""
        return "left" if self.kind == "causal" else "right"

    # -------------------------------------------------------------- batch_size: auto
    def _auto_batch_size(self) -> SearchResult:
        """The largest generate batch that fits, probed with the worst case the recipe can
        produce: copies of the longest prompt, forced to generate all max_new_tokens (the KV
        cache grows with every new token), num_beams as configured. Every rank runs the same
        probes and all-reduces "it fitted" (MIN), so all agree; a cached result is reused."""
        cfg, eval_set, generation = self.cfg, self.eval_set, self.cfg.generation
        prompt_ids = eval_set.prompt_ids
        longest = max(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), -i))
        prompt = prompt_ids[longest]
        worst = {
            "prompt_tokens": len(prompt),
            "new_tokens": generation.max_new_tokens,
            "num_beams": generation.num_beams,
        }
        limit = min(cfg.auto_batch_max, len(eval_set.ids))
        key = cache_key(
            device=device_description(),
            model=cfg.model.name_or_path,
            model_config=self.runtime.model_config.to_json_string(),
            worst_case=worst,
            limit=limit,
            dtype=self.dtype,
            deepspeed=self.ds_config,
            world_size=self.world_size,
            kind=self.kind,
            generation=asdict(generation),
            # Unmerged adapters add LoRA activations to the base's: their ranks key the cache.
            **({"adapter_ranks": adapter_ranks(self.generator)} if self.multi else {}),
        )
        pad = self.tokenizer.pad_token_id
        kwargs = {
            **generate_kwargs(generation),
            "min_new_tokens": generation.max_new_tokens,
            "eos_token_id": self.stop_ids,
        }

        def make(batch_size: int) -> dict[str, torch.Tensor]:
            inputs = pad_prompts([prompt] * batch_size, pad, self.padding_side)
            return {k: v.to(self.accelerator.device) for k, v in inputs.items()}

        def run_generate(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), self.accelerator.autocast():
                output = self.generator.generate(
                    **inputs, **kwargs, pad_token_id=pad, synced_gpus=self.sharded
                )
            return output.to("meta")  # only its shape goes into the trace

        def build(batch_size: int) -> ProbeSteps:  # the model is built once: nothing to rebuild
            return run_generate, lambda: None, lambda: None

        def choose(largest: int) -> tuple[int, int, str]:
            if largest < 1:
                raise UserError(
                    f"not even batch_size=1 fits generating {generation.max_new_tokens} tokens x "
                    f"{generation.num_beams} beam(s) for the longest prompt ({len(prompt)} tokens); "
                    "lower generation.max_new_tokens, generation.num_beams or "
                    "data.max_source_length, or evaluate under ZeRO-3."
                )
            note = (
                ""
                if largest < limit
                else f"the search stopped at its limit {limit} "
                f"(min of auto_batch_max={cfg.auto_batch_max} and {len(eval_set.ids)} examples)"
            )
            return margin_applied(largest, cfg.auto_batch_margin), 1, note

        prober = Prober(build, make, self.runtime.process_index, all_ranks_agree, "generate")
        result = cached_search(
            prober,
            limit,
            EvalFolder(self.output_dir).auto_batch_cache,
            key,
            self.is_main,
            choose=choose,
            worst_case_shape=worst,
        )
        self.runtime.log(result.log_line("batch_size", cfg.auto_batch_margin))
        return result

    # -------------------------------------------------------------- generate
    def generate(self) -> None:
        """Each system in turn, its adapter switched on: see `_generate_system`."""
        for system in self.systems:
            with system.activate():
                system.predictions, system.replies, system.throughput = self._generate_system(
                    system.name
                )

    @torch.no_grad()
    def _generate_system(
        self, name: str | None
    ) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
        """Every rank generates its batches; predictions are gathered to all ranks by id.
        Returns the predictions in eval-set order (chat: the parsed reply's content, or its
        calls where the reference is a tool call), the parsed replies (chat) and the
        throughput figures."""
        from accelerate.utils import gather_object

        cfg, accel, es = self.cfg, self.accelerator, self.eval_set
        tokenizer = self.tokenizer
        batches = make_batches([len(p) for p in es.prompt_ids], self.batch_size, cfg.sort_by_length)
        mine = deal_to_ranks(
            batches, self.world_size, accel.process_index, equal_calls=self.sharded
        )
        kwargs = {**generate_kwargs(cfg.generation), "eos_token_id": self.stop_ids}
        progress = None
        if self.is_main:
            from tqdm.auto import tqdm

            desc = f"generating {name}" if name else "generating"
            progress = tqdm(total=len(mine), desc=desc, dynamic_ncols=True)
        records: list[tuple[str, str, int, dict[str, Any] | None]] = []
        real_tokens = padded_slots = 0
        accel.wait_for_everyone()
        start = time.perf_counter()
        for positions, is_padding in mine:
            inputs = pad_prompts(
                [es.prompt_ids[i] for i in positions], tokenizer.pad_token_id, self.padding_side
            )
            inputs = {k: v.to(accel.device) for k, v in inputs.items()}
            with accel.autocast():
                # synced_gpus (ZeRO-3): every rank keeps stepping until all ranks' batches are done.
                output = self.generator.generate(
                    **inputs,
                    **kwargs,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=self.sharded,
                )
            # Decoder-only output repeats the (left-padded) prompt: the new tokens start after its
            # width. Encoder-decoder output opens with the decoder start token.
            new_tokens = (
                output[:, inputs["input_ids"].shape[1] :]
                if self.kind == "causal"
                else output[:, 1:]
            )
            if not is_padding:
                stopped = until_stop(new_tokens, self.stop_ids)
                counts = count_generated(new_tokens, self.stop_ids)
                for i, ids, n in zip(positions, stopped, counts, strict=True):
                    records.append((es.ids[i], *self._prediction(i, ids), n))
                real_tokens += int(inputs["attention_mask"].sum())
                padded_slots += inputs["attention_mask"].numel()
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        # Collective: every rank sends its (id, prediction, tokens) records and its counters.
        gathered = gather_object(records)
        stats = gather_object([(real_tokens, padded_slots)])
        accel.wait_for_everyone()
        seconds = time.perf_counter() - start
        predictions = merge_predictions([(r[0], r[1]) for r in gathered], es.ids)
        parsed = merge_predictions([(r[0], r[2]) for r in gathered], es.ids)
        generated_tokens = merge_predictions([(r[0], r[3]) for r in gathered], es.ids)
        total_generated = int(sum(generated_tokens))
        throughput = {
            "examples_per_second": round(len(es.ids) / seconds, 3),
            "generated_tokens_per_second": round(total_generated / seconds, 1),
            "generation_seconds": round(seconds, 3),
            "generated_tokens": total_generated,
            "mean_generated_tokens": round(total_generated / len(es.ids), 2),
            "prompt_padding_efficiency": round(
                sum(s[0] for s in stats) / max(1, sum(s[1] for s in stats)), 4
            ),
            "generate_calls_per_rank": len(mine),
            "world_size": self.world_size,
            "strategy": self.strategy,
            "batch_size": self.batch_size,
            "sort_by_length": cfg.sort_by_length,
            "device": accel.device.type,
        }
        self._log(
            f"{name + ': ' if name else ''}generated {len(es.ids)} examples in {seconds:.2f} s: {throughput['examples_per_second']:.2f} examples/s, "
            f"{throughput['generated_tokens_per_second']:.1f} generated tokens/s, prompt padding efficiency "
            f"{throughput['prompt_padding_efficiency']:.2f} ({'sorted' if cfg.sort_by_length else 'dataset order'})"
        )
        return predictions, [] if es.examples is None else parsed, throughput

    def _prediction(self, position: int, ids: list[int]) -> tuple[str, dict[str, Any] | None]:
        """One example's scored text and, for chat, its parsed reply: the content, or the
        calls' canonical text where the reference reply only calls tools."""
        es = self.eval_set
        if es.examples is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip(), None
        example = es.examples[position]
        reply = replies.parse_reply(self.tokenizer, ids, es.prompt_ids[position], example.tools)
        # what the model wrote, markup included, beside what was read from it
        reply["text"] = self.tokenizer.decode(ids, skip_special_tokens=False)
        if example.scores_calls:
            return replies.calls_text(reply.get("tool_calls")), reply
        return reply["content"], reply

    # -------------------------------------------------------------- score and save
    def save(self) -> dict[str, Any] | None:
        """Main process only: score and write each system's predictions.jsonl and rouge.json;
        one system: print its table and return its report; several: print and write their
        comparison (comparison.md, comparison.png in output_dir) and return {name: report}."""
        if not self.is_main:
            return None
        if not self.multi:
            report = self._save_system(self.systems[0])
            print(rouge.format_table(report), flush=True)
            print(self._wrote(self.systems[0]), flush=True)
            return report
        reports = {}
        for system in self.systems:
            reports[str(system.name)] = self._save_system(system)
            print(self._wrote(system), flush=True)
        print(write_comparison(self.systems, self.output_dir), flush=True)
        out = EvalFolder(self.output_dir)
        print(f"wrote {out.comparison_md} and {out.comparison_png.name}", flush=True)
        return reports

    def _save_system(self, system: System) -> dict[str, Any]:
        """One system's rouge.json and predictions.jsonl, in its folder, as its single run writes them."""
        report = build_report(
            system.cfg,
            self.eval_set,
            system.predictions,
            replies_=system.replies,
            kind=self.kind,
            dtype=self.dtype,
            throughput=system.throughput,
            auto_batch=self.auto_batch,
            stop_ids=self.stop_ids,
        )
        write_outputs(system.output_dir, report, self.eval_set, system.predictions, system.replies)
        return report

    @staticmethod
    def _wrote(system: System) -> str:
        folder = EvalFolder(system.output_dir)
        return f"wrote {folder.rouge} and {folder.predictions}"

    def cleanup(self) -> None:
        self.accelerator.wait_for_everyone()  # no rank tears down the process group while main scores
        self.runtime.shutdown()

    def _config_header(self, folder: Path | None = None, what: str = "") -> str:
        return (
            f"# Resolved evaluation config{what} (the single source of truth); rerun with:\n"
            f"#   python recipes/evaluate.py --config {EvalFolder(folder or self.output_dir).config}\n"
        )

    def _log(self, message: str) -> None:
        self.runtime.log(message)


def _load_merged_adapter(model: Any, adapter_path: str, base: str) -> Any:
    """Apply a LoRA adapter and merge it into the weights (plain layers generate faster)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:
        raise adapter_load_error(error, "model.adapter_path", adapter_path, base) from None
