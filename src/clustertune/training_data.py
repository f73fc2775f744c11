"""The tokenised splits a fine-tuning run trains on and measures its eval loss on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clustertune import chat
from clustertune import data as data_lib
from clustertune.config import DataConfig, FinetuneConfig, template_fields
from clustertune.errors import UserError
from clustertune.runtime import Runtime
from clustertune.sampler import GlobalBatchPlan, eval_micro_batches


@dataclass
class TrainData:
    """The tokenised splits and the collator that turns rows into padded tensors."""

    train: Any  # datasets.Dataset with input_ids, labels, num_source/target_tokens
    eval: Any | None  # the same for the periodic eval loss; None disables it
    collator: data_lib.Collator
    template: Any = None  # chat.ChatTemplate the rows were rendered with; None: raw text
    # several sources with eval splits: each one's eval rows (eval_loss/<name>); else empty
    eval_parts: dict[str, Any] = field(default_factory=dict)
    shares: list[Any] = field(default_factory=list)  # prepare.SourceShare of a mixture
    prepared: Any = None  # prepare.PreparedSet the rows were read from

    def collate(self, indices: np.ndarray, split: Any, device: Any) -> dict[str, Any]:
        """Rows `indices` of a tokenised split -> a padded (or packed) batch on `device`."""
        rows = split[[int(i) for i in indices]]
        examples = [
            {"input_ids": input_ids, "labels": labels}
            for input_ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
        ]
        return {k: v.to(device) for k, v in self.collator(examples).items()}


def check_data_for_model(data_cfg: DataConfig, kind: str) -> None:
    """What the data settings ask of the model, from its config alone (before any compute)."""
    if kind == "causal":
        return
    # the data section, then each mixture source's own settings (a source may set its format)
    sections = [("data", data_cfg), *((f"data.mixture[{s.label}]", s) for s in data_cfg.mixture)]
    for section, settings in sections:
        for name, asked, why in (
            ("format", "chat", "chat conversations need"),
            ("use_chat_template", True, "chat templates need"),
            ("packing", True, "packing needs"),
        ):
            key = f"{section}.{name}"
            if getattr(settings, name, None) == asked:
                raise UserError(
                    f"{key}: {why} a decoder-only model, and this one is seq2seq (its encoder "
                    "and decoder read separate sequences; it trains length-grouped and padded); "
                    f"remove {key}, or fine-tune a causal model."
                )


def tokenize_spec(
    data_cfg: DataConfig, kind: str, tokenizer: Any, model_name: str, trains_embeddings: bool = True
) -> data_lib.TokenizeSpec:
    """How rows become tokens for this model and tokenizer: the chat template resolved (the
    configured one set on the tokenizer, so final/ saves it; for a known family the training
    copy the masks come from) and checked, and whether text rows use it."""
    template = None
    if kind == "causal":
        added = chat.resolve_chat_template(tokenizer, data_cfg.chat_template)
        if added and not trains_embeddings:
            raise UserError(
                f"data.chat_template={data_cfg.chat_template} adds {', '.join(added)} to the "
                f"vocabulary of '{model_name}', which lacks them, and LoRA would leave their new "
                "embeddings untrained: use peft.method=none, or a model whose tokenizer has a "
                "chat template (or these tokens)."
            )
        if chat.uses_chat_template(
            tokenizer, data_cfg.format, data_cfg.use_chat_template, model_name
        ):
            template = chat.training_template(
                tokenizer, data_cfg.chat_template, data_cfg.template_date
            )
    return data_lib.TokenizeSpec(
        kind,
        data_cfg.prompt_template,
        data_cfg.target_column,
        data_cfg.max_source_length,
        data_cfg.max_target_length,
        format=data_cfg.format,
        messages_column=data_cfg.messages_column,
        tools_column=data_cfg.tools_column,
        train_on=data_cfg.train_on,
        max_length=data_cfg.max_length,
        template=template,
    )


def load_rows(data_cfg: DataConfig, source: str, split: str, what: str) -> Any:
    """One split, validated: text columns, or (chat) the conversation column."""
    if data_cfg.format == "chat":
        column, tools = data_cfg.messages_column, data_cfg.tools_column

        def row_problem(record: dict) -> str | None:
            problem = chat.parse_conversation(record.get(column), record.get(tools))
            if isinstance(problem, chat.Problem):
                return f"'{column if problem.field == 'messages' else tools}' {problem}"
            return None

        rows = data_lib.load_split(
            source,
            split=split,
            required_columns=[column],
            what=what,
            skip_invalid_rows=data_cfg.skip_invalid_rows,
            text_columns=[],  # checked per conversation by tokenize_dataset
            row_problem=row_problem,
            json_columns=[column, tools],
            column_keys={column: "data.messages_column"},
        )
        if tools != "tools" and tools not in rows.column_names:
            raise UserError(
                f"{what}: '{source}' has no column '{tools}' (columns: "
                f"{', '.join(rows.column_names)}); set data.tools_column to the column holding "
                "each row's tools, or leave it at its default 'tools' for rows without tools."
            )
        return rows
    return data_lib.load_split(
        source,
        split=split,
        required_columns=[*template_fields(data_cfg.prompt_template), data_cfg.target_column],
        what=what,
        skip_invalid_rows=data_cfg.skip_invalid_rows,
        text_columns=[],  # checked per row while tokenising (tokenize_rows)
    )


def tokenize_rows(
    rows: Any,
    tokenizer: Any,
    spec: data_lib.TokenizeSpec,
    data_cfg: DataConfig,
    source: str,
    what: str,
    row_offset: int = 0,
    num_proc: int | None = None,
    cache_file_name: str | None = None,
) -> Any:
    """Tokenise a split (or a shard of it starting at `row_offset`, into `cache_file_name`),
    then refuse its unusable rows naming the first, or skip them (data.skip_invalid_rows)."""
    tokenized = data_lib.tokenize_dataset(
        rows, tokenizer, spec, num_proc or data_cfg.num_proc, row_offset, cache_file_name
    )
    if spec.format == "chat":
        refuse_template_faults(tokenized, spec.template, len(rows))
        columns = {"messages": data_cfg.messages_column, "tools": data_cfg.tools_column}
        problems = data_lib.CHAT_PROBLEMS
    else:
        text = [*template_fields(data_cfg.prompt_template), data_cfg.target_column]
        columns, problems = {column: column for column in text}, None
    return data_lib.refuse_or_skip_unusable(
        tokenized,
        source=source,
        what=what,
        skip=data_cfg.skip_invalid_rows,
        columns=columns,
        problems=problems,
    )


def refuse_template_faults(tokenized: Any, template: Any, num_rows: int) -> None:
    """A template that refuses every row is at fault, not the data: one line naming the
    template and its error, never "N of N rows" with advice to skip them all."""
    positions = data_lib.problem_positions(tokenized)
    if not num_rows or len(positions) < num_rows:
        return
    faults = [chat.fault_of_refused(p) for p in tokenized.select(positions)["problem"]]
    refused = [fault for fault in faults if fault is not None]
    if len(refused) == num_rows:
        raise UserError(
            f"the chat template ({template.origin}) fails on every row: "
            f"{refused[0]}; fix the template"
            + (f" file {template.path}." if template.path else ".")
        )


def _say(message: str) -> None:
    print(message, flush=True)


def load_training_data(cfg: FinetuneConfig, runtime: Runtime, tokenizer: Any) -> TrainData:
    """The training (and eval-loss) rows, read memory-mapped from the prepared data of this
    config's fingerprint (clustertune-data prepare); what is not prepared yet is prepared here
    first. Ranks wait for a shard on its file lock, never in a collective, so no process-group
    timeout can end a run while its data is prepared. Refuses a training set smaller than one
    global batch."""
    from clustertune.prepare import ensure_prepared, load_prepared, open_prepared, plan_sources

    sources = plan_sources(cfg, tokenizer, runtime.kind)
    spec = sources[0].spec
    if spec.template is not None:
        runtime.log(spec.template.describe())
    prepared = open_prepared(cfg, tokenizer, runtime.kind, sources)
    started = time.perf_counter()
    # whichever rank prepares a shard says so (exactly one per shard, by its lock)
    ensure_prepared(prepared, sources, tokenizer, num_proc=cfg.data.num_proc, log=_say)
    loaded = load_prepared(prepared, sources, cfg)
    runtime.log(
        f"prepared data: {prepared.root} ({len(loaded.train):,} training examples, read "
        f"memory-mapped; {time.perf_counter() - started:.1f} s)"
    )
    train, evaluation = loaded.train, loaded.eval
    for share in loaded.shares:
        runtime.log(f"mixture: {share.describe(cfg.data.mixture_weights)}")
    if len(train) < cfg.train.global_batch_size:
        raise UserError(
            f"the training data has {len(train)} examples, fewer than "
            f"train.global_batch_size={cfg.train.global_batch_size}; lower the global batch size."
        )
    runtime.log(data_lib.truncation_report(train, "train", spec))
    if evaluation is not None:
        runtime.log(data_lib.truncation_report(evaluation, "eval", spec))
    decoder_start = None
    if runtime.kind == "seq2seq":
        decoder_start = getattr(runtime.model_config, "decoder_start_token_id", None)
        if decoder_start is None:
            decoder_start = tokenizer.pad_token_id
    collator = data_lib.Collator(tokenizer.pad_token_id, decoder_start, packing=cfg.data.packing)
    return TrainData(
        train=train,
        eval=evaluation,
        collator=collator,
        template=spec.template,
        eval_parts=loaded.eval_parts if len(loaded.eval_parts) > 1 else {},
        shares=loaded.shares,
        prepared=prepared,
    )


def _lengths(split: Any, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(untrained/encoder, trained tokens, input row tokens, decoder tokens or None) per row:
    a causal row holds the whole text, a seq2seq row the encoder side only."""
    sources = data_lib.column(split, "num_source_tokens").astype(np.int64)
    targets = data_lib.column(split, "num_target_tokens").astype(np.int64)
    if kind == "seq2seq":
        return sources, targets, sources, targets
    return sources, targets, sources + targets, None


def build_batch_plan(
    cfg: FinetuneConfig, data: TrainData, runtime: Runtime, micro_batch_size: int, tokens: int
) -> GlobalBatchPlan:
    sources, targets, rows, labels = _lengths(data.train, runtime.kind)
    return GlobalBatchPlan(
        source_lengths=sources,
        target_lengths=targets,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=micro_batch_size,
        world_size=runtime.world_size,
        rank=runtime.process_index,
        seed=cfg.seed,
        length_group_size=cfg.data.length_group_size,
        micro_batch_tokens=tokens,
        row_lengths=rows,
        label_lengths=labels,
        packing=cfg.data.packing,
    )


def eval_batches(
    cfg: FinetuneConfig, split: Any, runtime: Runtime, micro_batch_size: int, tokens: int
) -> list[tuple[np.ndarray, bool]]:
    """This rank's eval-loss micro-batches, (indices, is_padding), shaped as training's."""
    sources, targets, rows, labels = _lengths(split, runtime.kind)
    return eval_micro_batches(
        sources + targets,
        micro_batch_size,
        runtime.world_size,
        runtime.process_index,
        budget=tokens,
        row_lengths=rows,
        label_lengths=labels,
        packing=cfg.data.packing,
    )


@dataclass(frozen=True)
class Batching:
    """How the run cuts its global batches: examples or a token budget per micro-batch."""

    plan: GlobalBatchPlan
    micro_batch_size: int  # examples per micro-batch (1, nominal, with a token budget)
    tokens: int  # token budget per micro-batch; 0: micro_batch_size examples
    # global / (micro x world); with a token budget the most micro-steps per rank of any step
    grad_accum_steps: int
    auto_batch: Any  # autobatch.SearchResult of an `auto` search, else None


def resolve_batching(
    cfg: FinetuneConfig, runtime: Runtime, tokenizer: Any, data: TrainData, total_steps: int
) -> Batching:
    """train.micro_batch_size / micro_batch_tokens as numbers (auto: searched), and the plan."""
    from clustertune.probes import find_micro_batch  # it builds models: imported when needed

    tokens_setting, auto_batch = cfg.train.micro_batch_tokens, None
    if tokens_setting == "auto" or (cfg.train.micro_batch_size == "auto" and not tokens_setting):
        auto_batch = find_micro_batch(
            cfg, runtime, tokenizer, data.collator, data.train, tokens=bool(tokens_setting)
        )
    tokens = (auto_batch.chosen if auto_batch else int(tokens_setting)) if tokens_setting else 0
    micro = 1 if tokens else (auto_batch.chosen if auto_batch else int(cfg.train.micro_batch_size))
    plan = build_batch_plan(cfg, data, runtime, micro, tokens)
    accum = plan.most_micro_steps(total_steps) if tokens else plan.grad_accum_steps
    if tokens:
        # e.g. budget 2,048 on 2 ranks, global 32 of ~150 tokens padded: ~3 micro-steps a rank
        runtime.log(
            f"micro-batches of at most {tokens:,} tokens ({'packed' if cfg.data.packing else 'padded'}); "
            f"up to {accum} per rank per step for global_batch_size {cfg.train.global_batch_size}"
        )
    return Batching(plan, micro, tokens, accum, auto_batch)
