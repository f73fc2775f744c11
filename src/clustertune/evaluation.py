"""Evaluation: generation on every rank over stable example ids, exact ROUGE on the main process.

Lifecycle (like the Trainer): Evaluator(cfg).setup() -> generate() -> save() -> cleanup().

Why the result is the same for 1, 2 or N ranks:
- examples are sorted by prompt length (longest first, ties by position) and cut into
  batches of `batch_size` *before* anything depends on the world size, so every example is
  generated in the same batch, with the same padding, whatever the cluster shape;
- batch k goes to rank k % world_size; each prediction travels to the main process as a
  Python object (id, text) and is put back at its id's position, so an example can never
  count twice (the padding of a DistributedSampler's last shard, PITFALLS) or go missing;
- under ZeRO-3 every rank runs the same number of `generate` calls (a rank short of batches
  repeats the last one and drops its outputs) with `synced_gpus=True`, since each forward
  pass gathers parameters collectively: a rank that stopped early would hang the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from clustertune import data as data_lib
from clustertune import rouge
from clustertune.atomicio import atomic_path, write_text_atomic
from clustertune.autobatch import (
    Prober,
    SearchResult,
    cache_key,
    cached_search,
    device_description,
    margin_applied,
    to_json,
)
from clustertune.config import (
    SEED_PROMPT,
    FinetuneConfig,
    ModelConfig,
    PeftConfig,
    parse_config,
    write_resolved_config,
)
from clustertune.distributed import (
    all_ranks_agree,
    build_accelerator,
    deepspeed_config_path,
    fill_deepspeed_config,
    launched_world_size,
    load_deepspeed_json,
    zero_stage,
)
from clustertune.errors import UserError
from clustertune.modeling import (
    build_model,
    load_model_config,
    load_tokenizer,
    model_kind,
    resolve_dtype,
    zero3_init_disabled,
)
from clustertune.train import FINAL_MARKER, check_output_dir

ID_COLUMNS = ("id", "fname")  # DialogSum's Hub copy has `id`; the official jsonl has `fname`


# ---------------------------------------------------------------------------------- config


@dataclass
class EvalModelConfig:
    # Base model, or a full fine-tune (a run's final/). With run_dir: taken from the run.
    # Unset with model.adapter_path: the adapter's own base model.
    name_or_path: str | None = None
    # A LoRA adapter folder (adapter_config.json) applied to name_or_path and merged for speed.
    adapter_path: str | None = None
    # Allow a base whose name differs from the one the adapter records (e.g. a local copy of
    # the same hub model); shapes are still checked when the adapter is loaded.
    allow_base_mismatch: bool = False
    # auto | bf16 | fp32 | fp16 (fp16 refused for T5). auto: bf16 where supported, else fp32.
    dtype: str = "auto"


@dataclass
class EvalDataConfig:
    # Local jsonl/json/csv/parquet file, or a hub dataset id (then split is used).
    eval_file: str | None = None
    # Hub dataset id (alternative to eval_file).
    dataset: str | None = None
    # Split of the hub dataset.
    split: str = "test"
    # Columns holding the reference summaries; every one is scored (best, mean, first).
    reference_columns: list[str] = field(default_factory=lambda: ["summary"])
    # Column with a unique example id; unset: `id`, else `fname`, else the row index.
    id_column: str | None = None
    # Unset: the training run's value with run_dir, else "dialogue".
    source_column: str | None = None
    # Unset: the training run's prompt with run_dir, else the seed tutorial's prompt.
    prompt_template: str | None = None
    # Prompt tokens kept. Unset: the training run's value with run_dir, else 512.
    max_source_length: int | None = None
    # Evaluate only the first N examples (None: all).
    max_examples: int | None = None


@dataclass
class GenerationSettings:
    # Tokens generated per example at most (DialogSum summaries: ~25 median, rarely > 100).
    max_new_tokens: int = 128
    # Tokens generated per example at least (0: stop at the first EOS).
    min_new_tokens: int = 0
    # 1: greedy. Beam search costs num_beams x the compute and memory of greedy.
    num_beams: int = 1
    # Sampling makes predictions depend on the seed and on the world size; off for evaluation.
    do_sample: bool = False
    # Used only with do_sample.
    temperature: float = 1.0
    # Used only with do_sample.
    top_p: float = 1.0
    # Used only with do_sample.
    top_k: int = 50
    # Beam search only: > 1 favours longer outputs, < 1 shorter.
    length_penalty: float = 1.0
    # Beam search only: stop when num_beams finished candidates exist.
    early_stopping: bool = False
    # Forbid repeating any n-gram of this size (0: off).
    no_repeat_ngram_size: int = 0
    # > 1 penalises tokens already generated (1: off).
    repetition_penalty: float = 1.0


@dataclass
class EvaluateConfig:
    # Everything the evaluation writes: config.yaml, predictions.jsonl, rouge.json.
    output_dir: str = "outputs/eval"
    # A training output_dir: the model is its final/ (or its base + final/ as LoRA adapter),
    # and data.source_column/prompt_template/max_source_length default to the run's.
    run_dir: str | None = None
    # Seeds sampling (if on) and the bootstrap of the confidence intervals.
    seed: int = 42
    # Prompts per generate call on one rank; memory grows with batch x (prompt + new tokens).
    # auto: the largest that fits generating max_new_tokens (x num_beams) for the longest
    # prompt, agreed by all ranks, minus auto_batch_margin; cached in <output_dir>/auto_batch.json.
    batch_size: int | str = 16
    # batch_size auto: use at most (1 - margin) x the largest batch that fitted.
    auto_batch_margin: float = 0.1
    # batch_size auto: search no further than this (and never beyond the number of examples).
    auto_batch_max: int = 256
    # Batch prompts of similar length (longest first): far less padding. false: dataset order.
    sort_by_length: bool = True
    # Bootstrap resamples for the 95% confidence intervals (1000: ~0.1 s per 1,000 examples).
    num_bootstrap: int = 1000
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


# ------------------------------------------------------- resolving the model before compute


def _same_model(a: str, b: str) -> bool:
    """Hub ids compare as strings; local folders by their resolved path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_base(adapter_path: str) -> str:
    """The base model an adapter was trained on, read from its adapter_config.json."""
    folder = Path(adapter_path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"model.adapter_path: '{adapter_path}' does not exist; give the adapter folder "
            "(a LoRA run's final/, with adapter_config.json)."
        )
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"model.adapter_path: '{adapter_path}' has no adapter_config.json, so it is not a "
            "LoRA adapter; for a full fine-tune set model.name_or_path to it instead."
        )
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as error:
        raise UserError(f"model.adapter_path: {config_file} is not valid JSON ({error}).") from None
    if not base:
        raise UserError(
            f"model.adapter_path: {config_file} names no base_model_name_or_path; set model.name_or_path."
        )
    return str(base)


def _unset_or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _from_run_dir(cfg: EvaluateConfig) -> EvaluateConfig:
    """Take the model and (where unset) the prompt settings from a finished training run."""
    run = Path(cfg.run_dir).expanduser()
    config_file, final = run / "config.yaml", run / "final"
    if not run.is_dir():
        raise UserError(
            f"run_dir: '{cfg.run_dir}' does not exist; give a training output_dir (config.yaml, final/)."
        )
    if not config_file.is_file():
        raise UserError(
            f"run_dir: '{cfg.run_dir}' has no config.yaml, so it is not a clustertune training output_dir."
        )
    if not (final / FINAL_MARKER).is_file():
        raise UserError(
            f"run_dir: '{cfg.run_dir}' has no complete final/ ({FINAL_MARKER} missing): the training has "
            "not finished; rerun its command to finish it, or evaluate another run."
        )
    train_cfg = parse_config(FinetuneConfig, ["--config", str(config_file)])
    is_adapter = (final / "adapter_config.json").is_file()
    model_name = train_cfg.model.name_or_path if is_adapter else str(final)
    if cfg.model.adapter_path is not None and not (
        is_adapter and _same_model(cfg.model.adapter_path, str(final))
    ):
        raise UserError(
            f"model.adapter_path='{cfg.model.adapter_path}' and run_dir='{cfg.run_dir}' both name a model; "
            "set only one of them."
        )
    model = replace(
        cfg.model, name_or_path=model_name, adapter_path=str(final) if is_adapter else None
    )
    d, trained = cfg.data, train_cfg.data
    data = replace(
        d,
        source_column=_unset_or(d.source_column, trained.source_column),
        prompt_template=_unset_or(d.prompt_template, trained.prompt_template),
        max_source_length=_unset_or(d.max_source_length, trained.max_source_length),
    )
    return replace(cfg, model=model, data=data)


def resolve_config(cfg: EvaluateConfig) -> tuple[EvaluateConfig, list[str]]:
    """Fill every unset key (from run_dir, the adapter, or the defaults) and check the inputs
    that need no model and no process group. Returns the resolved config and notes to print."""
    notes: list[str] = []
    if cfg.run_dir is not None:
        previous = cfg.model.name_or_path
        cfg = _from_run_dir(cfg)
        if previous is not None and not _same_model(previous, cfg.model.name_or_path or ""):
            notes.append(
                f"run_dir sets the model: model.name_or_path {previous} -> {cfg.model.name_or_path}"
            )
    model = cfg.model
    if model.adapter_path is not None:
        recorded_base = adapter_base(model.adapter_path)
        if model.name_or_path is None:
            model = replace(model, name_or_path=recorded_base)
        elif not _same_model(model.name_or_path, recorded_base):
            if not model.allow_base_mismatch:
                raise UserError(
                    f"model.adapter_path: the adapter in '{model.adapter_path}' was trained on base "
                    f"'{recorded_base}', but model.name_or_path is '{model.name_or_path}'; set "
                    f"model.name_or_path={recorded_base} (or model.allow_base_mismatch=true for a copy of it)."
                )
            notes.append(
                f"adapter base {recorded_base} != model.name_or_path {model.name_or_path} (allowed)"
            )
    if model.name_or_path is None:
        raise UserError(
            "no model: set model.name_or_path (base or full fine-tune), model.adapter_path, or run_dir."
        )
    d = cfg.data
    data = replace(
        d,
        source_column=_unset_or(d.source_column, "dialogue"),
        prompt_template=_unset_or(d.prompt_template, SEED_PROMPT),
        max_source_length=_unset_or(d.max_source_length, 512),
    )
    cfg = replace(cfg, model=model, data=data)
    _check_values(cfg)
    return cfg, notes


def _check_values(cfg: EvaluateConfig) -> None:
    d, g = cfg.data, cfg.generation
    if not (d.eval_file or d.dataset):
        raise UserError(
            "no eval data: set data.eval_file (a local file or hub id) or data.dataset with data.split."
        )
    if d.eval_file and d.dataset:
        raise UserError("set only one of data.eval_file and data.dataset.")
    if not d.reference_columns:
        raise UserError(
            "data.reference_columns is empty; list the reference column(s), e.g. [summary]."
        )
    if d.source_column not in data_lib.template_fields(d.prompt_template):
        raise UserError(
            f"data.prompt_template has no {{{d.source_column}}} placeholder for "
            f"data.source_column='{d.source_column}'; add it to the template."
        )
    if d.max_examples is not None and d.max_examples < 1:
        raise UserError(
            f"data.max_examples={d.max_examples} leaves an empty eval set; use a positive number or null."
        )
    if isinstance(cfg.batch_size, str) and cfg.batch_size != "auto":
        raise UserError(f"batch_size={cfg.batch_size!r} must be a number or auto.")
    if not 0.0 <= cfg.auto_batch_margin < 1.0:
        raise UserError(f"auto_batch_margin={cfg.auto_batch_margin} must be in [0, 1), e.g. 0.1.")
    positive = {
        "batch_size": 1 if cfg.batch_size == "auto" else cfg.batch_size,
        "auto_batch_max": cfg.auto_batch_max,
        "generation.max_new_tokens": g.max_new_tokens,
        "generation.num_beams": g.num_beams,
        "data.max_source_length": d.max_source_length,
        "num_bootstrap": cfg.num_bootstrap,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key}={value} must be at least 1.")


def generate_kwargs(g: GenerationSettings) -> dict[str, Any]:
    """Only the settings that apply (transformers warns about e.g. temperature without sampling),
    each passed explicitly, so a model's generation_config.json cannot change them."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": g.max_new_tokens,
        "min_new_tokens": g.min_new_tokens,
        "num_beams": g.num_beams,
        "do_sample": g.do_sample,
        "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "repetition_penalty": g.repetition_penalty,
        "use_cache": True,  # a config saved with gradient checkpointing may say use_cache=false
    }
    if g.do_sample:
        kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    if g.num_beams > 1:
        kwargs.update(length_penalty=g.length_penalty, early_stopping=g.early_stopping)
    return kwargs


# ---------------------------------------------------------------------------- examples


def assign_ids(
    columns: Mapping[str, Sequence[Any]], num_rows: int, id_column: str | None = None
) -> tuple[list[str], str]:
    """Stable example ids and where they came from: `id_column`, else the first of `id`/`fname`
    whose values are unique, else the row index. Returns (ids, source)."""
    if id_column is not None:
        if id_column not in columns:
            raise UserError(
                f"data.id_column='{id_column}' is not a column ({', '.join(columns)}); unset it to use row numbers."
            )
        ids = [str(value) for value in columns[id_column]]
        if len(set(ids)) != len(ids):
            duplicate = Counter(ids).most_common(1)[0][0]
            raise UserError(
                f"data.id_column='{id_column}' is not unique (e.g. '{duplicate}'); unset it to use row numbers."
            )
        return ids, id_column
    for name in ID_COLUMNS:
        if name in columns:
            ids = [str(value) for value in columns[name]]
            if len(set(ids)) == len(ids) and all(ids):
                return ids, name
    return [str(index) for index in range(num_rows)], "row index"


def reference_lists(
    columns: Mapping[str, Sequence[Any]], reference_columns: Sequence[str], ids: Sequence[str]
) -> list[list[str]]:
    """Per example, its non-empty references in column order (the first is `first_reference`)."""
    references = []
    for row, example_id in enumerate(ids):
        texts = [
            str(columns[c][row])
            for c in reference_columns
            if columns[c][row] is not None and str(columns[c][row]).strip()
        ]
        if not texts:
            raise UserError(
                f"example '{example_id}' has no reference in {list(reference_columns)}; fix the data or data.reference_columns."
            )
        references.append(texts)
    return references


@dataclass
class EvalSet:
    ids: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]  # exactly what training feeds the model (same truncation)
    references: list[list[str]]
    id_source: str
    num_truncated: int


def load_eval_set(d: EvalDataConfig, tokenizer: Any, kind: str) -> EvalSet:
    """Load, validate and tokenise the eval data. `d` must be resolved (resolve_config).

    Prompts go through data.tokenize_dataset, the training pipeline, with the first reference
    as its target: seq2seq input_ids are the prompt; causal ones are prompt + target, of which
    the first num_source_tokens are the prompt. Truncation is therefore training's, by construction.
    """
    source, what = (d.eval_file, "data.eval_file") if d.eval_file else (d.dataset, "data.dataset")
    dataset = data_lib.load_split(
        source,
        split=d.split,
        required_columns=data_lib.template_fields(d.prompt_template),
        what=what,
    )
    missing = [c for c in d.reference_columns if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"data.reference_columns: '{source}' has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(dataset.column_names)}); set data.reference_columns to the reference summary column(s)."
        )
    if d.max_examples is not None:
        dataset = dataset.select(range(min(d.max_examples, len(dataset))))
    columns = dataset.to_dict()
    ids, id_source = assign_ids(columns, len(dataset), d.id_column)
    references = reference_lists(columns, d.reference_columns, ids)
    spec = data_lib.TokenizeSpec(
        kind,
        d.prompt_template,
        d.reference_columns[0],
        d.max_source_length,
        max_target_length=1 << 30,
    )
    tokenized = data_lib.tokenize_dataset(dataset, tokenizer, spec)
    lengths = tokenized["num_source_tokens"]
    prompt_ids = [
        ids_[:length] for ids_, length in zip(tokenized["input_ids"], lengths, strict=True)
    ]
    rows = [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]
    prompts = [d.prompt_template.format(**row) for row in rows]
    return EvalSet(
        ids, prompts, prompt_ids, references, id_source, int(sum(tokenized["source_truncated"]))
    )


# ---------------------------------------------------------------------------- batching


def make_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Example positions cut into batches, independent of the world size. Sorted: longest
    first, ties by position (deterministic), so each batch pads to a similar length."""
    order = (
        sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        if sort_by_length
        else list(range(len(lengths)))
    )
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def rank_batches(
    batches: Sequence[list[int]], world_size: int, rank: int, equal_calls: bool
) -> list[tuple[list[int], bool]]:
    """This rank's batches, round-robin, as (positions, is_padding).

    equal_calls (ZeRO-3): every rank gets ceil(len(batches) / world_size) calls; a rank short
    of work repeats the last (shortest, when sorted) batch and its outputs are dropped.
    """
    mine = [(list(batch), False) for batch in batches[rank::world_size]]
    if equal_calls and batches:
        calls = math.ceil(len(batches) / world_size)
        mine += [(list(batches[-1]), True)] * (calls - len(mine))
    return mine


def pad_prompts(rows: Sequence[list[int]], pad_token_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad to the longest prompt: left for decoder-only models (generation continues from the
    last position), right for encoder-decoders (the encoder masks padding anywhere)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def count_generated(new_tokens: torch.Tensor, eos_token_ids: Iterable[int]) -> list[int]:
    """Generated tokens per row up to and including the first EOS (the rest is padding)."""
    eos = set(eos_token_ids)
    counts = []
    for row in new_tokens.tolist():
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        counts.append(len(row) if stop is None else stop + 1)
    return counts


def merge_predictions(records: Iterable[Sequence[Any]], ids: Sequence[str]) -> list[Any]:
    """Records (id, value, ...) gathered from all ranks -> values in the order of `ids`.

    De-duplicated by id (the first record of an id wins), so an example repeated to fill a
    shard can never count twice; a missing id is an error, not a silently smaller eval set.
    """
    by_id: dict[str, Any] = {}
    for example_id, value, *_ in records:
        by_id.setdefault(example_id, value)
    missing = [example_id for example_id in ids if example_id not in by_id]
    if missing:
        raise RuntimeError(
            f"no prediction for {len(missing)} of {len(ids)} examples (e.g. {missing[:3]}) after gathering."
        )
    return [by_id[example_id] for example_id in ids]


# ---------------------------------------------------------------------------- outputs


def _rounded(scores: Mapping[str, float]) -> dict[str, float]:
    return {metric: round(value, 4) for metric, value in scores.items()}


def example_scores(prediction: str, references: list[str]) -> dict[str, Any]:
    """Per-example ROUGE for predictions.jsonl, under the report's protocol names."""
    scores = rouge.score_example(prediction, references)
    return {
        **{rouge.REPORT_PROTOCOL_NAMES[p]: _rounded(scores[p]) for p in rouge.PROTOCOLS},
        "per_reference": [_rounded(s) for s in scores["per_reference"]],
    }


# ---------------------------------------------------------------------------- the evaluator


class Evaluator:
    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        self.cfg, notes = resolve_config(self.cfg)
        cfg = self.cfg
        check_output_dir(self.output_dir)
        self.world_size = launched_world_size()
        self.model_config = load_model_config(cfg.model.name_or_path)
        self.kind = model_kind(self.model_config)
        self.dtype = resolve_dtype(cfg.model.dtype, self.model_config)
        ds_path = deepspeed_config_path()
        # Inference has no accumulation and no clipping: micro batch = batch_size, accum 1.
        self.ds_config = (
            None
            if not ds_path
            else fill_deepspeed_config(
                load_deepspeed_json(ds_path),
                micro_batch_size=1 if cfg.batch_size == "auto" else cfg.batch_size,
                grad_accum_steps=1,
                world_size=self.world_size,
                max_grad_norm=1.0,
                dtype=self.dtype,
            )
        )
        self.zero3 = zero_stage(self.ds_config) == 3
        if self.ds_config is not None:
            self.strategy = f"ZeRO-{zero_stage(self.ds_config)}"
            if not self.zero3:
                # ZeRO-1/2 shard optimizer states and gradients, which inference has none of
                # (DeepSpeed refuses stage 1/2 without an optimizer); the weights are replicated
                # either way, so the engine is built as stage 0.
                self.ds_config["zero_optimization"] = {"stage": 0}
                self.strategy += " (weights replicated: stage 0 for inference)"
        else:
            self.strategy = "DDP" if self.world_size > 1 else "single process"
        self.accelerator = build_accelerator(
            ds_config=self.ds_config,
            dtype=self.dtype,
            project_dir=str(self.output_dir),
            report_to=[],
        )
        accel = self.accelerator
        if accel.num_processes != self.world_size:
            raise RuntimeError(
                f"accelerate sees {accel.num_processes} processes, the launcher {self.world_size}"
            )
        self.is_main = accel.is_main_process
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        for note in notes:
            self._log(f"note: {note}")
        if self.is_main:
            write_resolved_config(
                cfg, self.output_dir / "config.yaml", header=self._config_header()
            )
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        with accel.main_process_first():  # rank 0 tokenises and caches; the others read the cache
            self.eval_set = load_eval_set(cfg.data, self.tokenizer, self.kind)
        es = self.eval_set
        self._log(
            f"eval: {len(es.ids)} examples from {cfg.data.eval_file or cfg.data.dataset} (ids: {es.id_source}), "
            f"{len(cfg.data.reference_columns)} reference column(s), {es.num_truncated} prompts truncated "
            f"to {cfg.data.max_source_length} tokens"
        )
        self._setup_model()
        self.auto_batch: SearchResult | None = None
        if cfg.batch_size == "auto":
            self.auto_batch = self._auto_batch_size()
            self.batch_size = self.auto_batch.chosen
        else:
            self.batch_size = cfg.batch_size

    def _setup_model(self) -> None:
        cfg, accel = self.cfg, self.accelerator
        # With an adapter the base is loaded whole (not partitioned by zero.Init) so that the
        # adapter can be loaded and merged; deepspeed.initialize partitions it afterwards.
        loading = zero3_init_disabled() if cfg.model.adapter_path else contextlib.nullcontext()
        with loading:
            model = build_model(
                ModelConfig(name_or_path=cfg.model.name_or_path, dtype=cfg.model.dtype),
                PeftConfig(method="none"),
                self.model_config,
            )
        if cfg.model.adapter_path:
            model = _load_merged_adapter(model, cfg.model.adapter_path, cfg.model.name_or_path)
        model.eval().requires_grad_(False)
        if self.ds_config is not None:
            # ZeRO-3: the engine partitions the weights; its forward hooks gather them per layer.
            self.model = accel.prepare(model)
        else:
            # DDP: one replica per rank and nothing to all-reduce, so no DDP wrapper (which also
            # refuses a model without trainable parameters): device placement and autocast only.
            self.model = accel.prepare_model(model, evaluation_mode=True)
        self.generator = accel.unwrap_model(self.model)
        self.generator.eval()
        self._log(
            f"model: {cfg.model.name_or_path}"
            + (f" + adapter {cfg.model.adapter_path} (merged)" if cfg.model.adapter_path else "")
            + f", {self.kind}, dtype {self.dtype}, {self.strategy}, {self.world_size} process(es)"
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
        cfg, es, g = self.cfg, self.eval_set, self.cfg.generation
        longest = max(range(len(es.prompt_ids)), key=lambda i: (len(es.prompt_ids[i]), -i))
        prompt = es.prompt_ids[longest]
        worst = {
            "prompt_tokens": len(prompt),
            "new_tokens": g.max_new_tokens,
            "num_beams": g.num_beams,
        }
        limit = min(cfg.auto_batch_max, len(es.ids))
        key = cache_key(
            device=device_description(),
            model=cfg.model.name_or_path,
            model_config=self.model_config.to_json_string(),
            worst_case=worst,
            limit=limit,
            dtype=self.dtype,
            deepspeed=self.ds_config,
            world_size=self.world_size,
            kind=self.kind,
            generation=asdict(g),
        )
        pad = self.tokenizer.pad_token_id
        kwargs = {**generate_kwargs(g), "min_new_tokens": g.max_new_tokens}

        def make(batch_size: int) -> dict[str, torch.Tensor]:
            inputs = pad_prompts([prompt] * batch_size, pad, self.padding_side)
            return {k: v.to(self.accelerator.device) for k, v in inputs.items()}

        def run_generate(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), self.accelerator.autocast():
                output = self.generator.generate(
                    **inputs, **kwargs, pad_token_id=pad, synced_gpus=self.zero3
                )
            return output.to("meta")  # only its shape goes into the trace

        def build(batch_size: int) -> tuple:  # the model is built once: nothing to rebuild
            return run_generate, lambda: None, lambda: None

        prober = Prober(build, make, self.accelerator.process_index, all_ranks_agree, "generate")
        largest, probes, seconds, was_cached = cached_search(
            prober, limit, self.output_dir / "auto_batch.json", key, self.is_main
        )
        if largest < 1:
            raise UserError(
                f"not even batch_size=1 fits generating {g.max_new_tokens} tokens x {g.num_beams} beam(s) "
                f"for the longest prompt ({len(prompt)} tokens); lower generation.max_new_tokens, "
                "generation.num_beams or data.max_source_length, or evaluate under ZeRO-3."
            )
        chosen = margin_applied(largest, cfg.auto_batch_margin)
        result = SearchResult(
            largest_fitting=largest,
            chosen=chosen,
            grad_accum_steps=1,
            probes=probes,
            worst_case_shape=worst,
            seconds=seconds,
            cached=was_cached,
            note=""
            if largest < limit
            else f"the search stopped at its limit {limit} "
            f"(min of auto_batch_max={cfg.auto_batch_max} and {len(es.ids)} examples)",
        )
        how = "from cache" if was_cached else f"searched {len(probes)} sizes in {seconds:.1f} s"
        self._log(
            f"auto batch_size: largest fitting {largest}, chosen {chosen} "
            f"(margin {cfg.auto_batch_margin:.0%}); {how}"
            + (f"; {result.note}" if result.note else "")
        )
        return result

    # -------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self) -> None:
        """Every rank generates its batches; predictions are gathered to all ranks by id."""
        from accelerate.utils import gather_object

        cfg, accel, es = self.cfg, self.accelerator, self.eval_set
        tokenizer = self.tokenizer
        batches = make_batches([len(p) for p in es.prompt_ids], self.batch_size, cfg.sort_by_length)
        mine = rank_batches(batches, self.world_size, accel.process_index, equal_calls=self.zero3)
        kwargs = generate_kwargs(cfg.generation)
        eos = self.generator.generation_config.eos_token_id
        eos_ids = (
            [tokenizer.eos_token_id]
            if eos is None
            else ([eos] if isinstance(eos, int) else list(eos))
        )
        progress = None
        if self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(mine), desc="generating", dynamic_ncols=True)
        records: list[tuple[str, str, int]] = []
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
                    **inputs, **kwargs, pad_token_id=tokenizer.pad_token_id, synced_gpus=self.zero3
                )
            # Decoder-only output repeats the prompt; encoder-decoder output opens with the decoder start token.
            new_tokens = (
                output[:, inputs["input_ids"].shape[1] :]
                if self.kind == "causal"
                else output[:, 1:]
            )
            if not is_padding:
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                counts = count_generated(new_tokens, eos_ids)
                records += [
                    (es.ids[i], text.strip(), n)
                    for i, text, n in zip(positions, texts, counts, strict=True)
                ]
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
        self.predictions = merge_predictions(gathered, es.ids)
        generated_tokens = merge_predictions([(r[0], r[2]) for r in gathered], es.ids)
        total_generated = int(sum(generated_tokens))
        self.throughput = {
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
        t = self.throughput
        self._log(
            f"generated {len(es.ids)} examples in {seconds:.2f} s: {t['examples_per_second']:.2f} examples/s, "
            f"{t['generated_tokens_per_second']:.1f} generated tokens/s, prompt padding efficiency "
            f"{t['prompt_padding_efficiency']:.2f} ({'sorted' if cfg.sort_by_length else 'dataset order'})"
        )

    # -------------------------------------------------------------- score and save
    def save(self) -> dict[str, Any] | None:
        """Main process only: score, write predictions.jsonl and rouge.json, print the table."""
        if not self.is_main:
            return None
        cfg, es = self.cfg, self.eval_set
        report = rouge.rouge_report(
            self.predictions, es.references, num_bootstrap=cfg.num_bootstrap, seed=cfg.seed
        )
        report["model"] = {
            "name_or_path": cfg.model.name_or_path,
            "adapter_path": cfg.model.adapter_path,
            "run_dir": cfg.run_dir,
            "kind": self.kind,
            "dtype": self.dtype,
        }
        report["dataset"] = {
            "source": cfg.data.eval_file or cfg.data.dataset,
            "split": None if cfg.data.eval_file else cfg.data.split,
            "num_examples": len(es.ids),
            "max_examples": cfg.data.max_examples,
            "ids": es.id_source,
            "source_column": cfg.data.source_column,
            "reference_columns": list(cfg.data.reference_columns),
            "prompt_template": cfg.data.prompt_template,
            "max_source_length": cfg.data.max_source_length,
            "prompts_truncated": es.num_truncated,
        }
        report["generation"] = asdict(cfg.generation)
        report["throughput"] = self.throughput
        if self.auto_batch is not None:
            report["auto_batch"] = to_json(self.auto_batch)
        lines = []
        for example_id, prompt, prediction, references in zip(
            es.ids, es.prompts, self.predictions, es.references, strict=True
        ):
            lines.append(
                json.dumps(
                    {
                        "id": example_id,
                        "prompt": prompt,
                        "prediction": prediction,
                        "references": references,
                        "scores": example_scores(prediction, references),
                    }
                )
            )
        write_text_atomic(self.output_dir / "predictions.jsonl", "\n".join(lines) + "\n")
        write_text_atomic(self.output_dir / "rouge.json", json.dumps(report, indent=2) + "\n")
        print(rouge.format_table(report), flush=True)
        print(
            f"wrote {self.output_dir / 'rouge.json'} and {self.output_dir / 'predictions.jsonl'}",
            flush=True,
        )
        return report

    def cleanup(self) -> None:
        self.accelerator.wait_for_everyone()  # no rank tears down the process group while main scores

    def _config_header(self) -> str:
        return (
            "# Resolved evaluation config (the single source of truth); rerun with:\n"
            f"#   python recipes/evaluate.py --config {self.output_dir / 'config.yaml'}\n"
        )

    def _log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _load_merged_adapter(model: Any, adapter_path: str, base: str) -> Any:
    """Apply a LoRA adapter and merge it into the weights (plain layers generate faster).
    A shape mismatch means the adapter was made for another base: one sentence, not a traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()
        detail = next(
            (line.strip() for line in first if "size mismatch" in line),
            first[0] if first else type(error).__name__,
        )
        raise UserError(
            f"model.adapter_path: the adapter in '{adapter_path}' does not fit base model '{base}' ({detail[:300]}); "
            "it was made for another base: set model.name_or_path to that base."
        ) from None


# ---------------------------------------------------------------------------- --compare


def load_report(eval_dir: str | Path) -> dict[str, Any]:
    path = Path(eval_dir) / "rouge.json"
    if not path.is_file():
        raise UserError(f"--compare: '{eval_dir}' has no rouge.json; give evaluation output_dirs.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--compare: {path} is not valid JSON ({error}).") from None


def comparison_table(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Markdown table: best-reference ROUGE [95% CI] per run, the other protocols, and the
    change against the first run (the seed's "absolute improvement over the original model")."""
    header = ["metric", *labels]
    rows = []
    for metric in rouge.METRICS:
        base = reports[0][metric]
        cells = [metric]
        for index, report in enumerate(reports):
            low, high = report["confidence_intervals"]["best_reference"][metric]
            cell = f"{report[metric]:.2f} [{low:.2f}, {high:.2f}]"
            if index:
                cell += f" ({report[metric] - base:+.2f})"
            cells.append(cell)
        rows.append(cells)
    for protocol in ("mean_over_references", "first_reference"):
        for metric in ("rouge1", "rougeL"):
            rows.append(
                [
                    f"{metric} ({protocol})",
                    *(f"{r['protocols'][protocol][metric]:.2f}" for r in reports),
                ]
            )
    rows.append(["examples", *(str(r["num_examples"]) for r in reports)])
    rows.append(
        [
            "examples/s",
            *(
                f"{r.get('throughput', {}).get('examples_per_second', float('nan')):.2f}"
                for r in reports
            ),
        ]
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _comparison_caveats(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    caveats = []
    first = reports[0].get("dataset", {})
    for label, report in zip(labels[1:], reports[1:], strict=True):
        other = report.get("dataset", {})
        for key in ("source", "split", "num_examples", "reference_columns", "prompt_template"):
            if other.get(key) != first.get(key):
                caveats.append(
                    f"{label} differs from {labels[0]} in dataset.{key}: the scores are not comparable as they stand."
                )
    return caveats


def plot_comparison(
    reports: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path
) -> None:
    """Grouped bars per metric, one per run, with the 95% bootstrap interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rouge.METRICS))
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(rouge.METRICS), 4.5))
    for index, (label, report) in enumerate(zip(labels, reports, strict=True)):
        values = np.array([report[m] for m in rouge.METRICS])
        ci = np.array([report["confidence_intervals"]["best_reference"][m] for m in rouge.METRICS])
        errors = np.abs(ci.T - values)
        bars = ax.bar(
            x + (index - (len(reports) - 1) / 2) * width,
            values,
            width,
            yerr=errors,
            capsize=3,
            label=label,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, rouge.METRICS)
    ax.set_ylabel("ROUGE F x100 (best reference, 95% CI)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def compare_runs(
    eval_dirs: Sequence[str], labels: Sequence[str] | None, out_dir: str | Path
) -> str:
    """Side-by-side table of several evaluations; writes comparison.md and comparison.png."""
    if len(eval_dirs) < 1:
        raise UserError("--compare needs at least one evaluation output_dir.")
    labels = list(labels) if labels else [Path(d).name for d in eval_dirs]
    if len(labels) != len(eval_dirs):
        raise UserError(
            f"--labels has {len(labels)} names for {len(eval_dirs)} folders; give one label per folder."
        )
    reports = [load_report(d) for d in eval_dirs]
    table = comparison_table(reports, labels)
    caveats = _comparison_caveats(reports, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = reports[0].get("dataset", {})
    markdown = "\n".join(
        [
            "# ROUGE comparison",
            "",
            f"Data: {first.get('source')} ({first.get('num_examples')} examples, references {first.get('reference_columns')}). "
            "ROUGE F x100 with stemming; headline rows take the best reference per example, with a seeded 95% "
            f"bootstrap interval; (+x) is the change against {labels[0]}.",
            "",
            table,
            "",
            *(f"- warning: {c}" for c in caveats),
            *(f"- {label}: `{d}`" for label, d in zip(labels, eval_dirs, strict=True)),
            "",
        ]
    )
    write_text_atomic(out / "comparison.md", markdown)
    plot_comparison(reports, labels, out / "comparison.png")
    return "\n".join([table, *(f"warning: {c}" for c in caveats)])
