"""The fine-tuning recipe's config (recipes/finetune.py): one dataclass per section, each
field with the comment `--help` shows, each section checking its own values."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from clustertune.config.checks import (
    SEED_PROMPT,
    Auto,
    DataFormat,
    LrSchedule,
    MixtureWeights,
    PeftMethod,
    Precision,
    TrainOn,
    Validated,
    at_least,
    check_date,
    check_prompt_template,
    check_source_placeholder,
    check_tracker_name,
    in_range,
    positive,
)
from clustertune.errors import UserError


@dataclass
class ModelConfig(Validated):
    SECTION: ClassVar[str] = "model"
    # Hub id or local folder of a seq2seq (T5, FLAN-T5, BART) or decoder-only model.
    name_or_path: str = "google/flan-t5-base"
    # Overrides every dropout probability in the model config; 0 makes runs comparable step for step.
    dropout: float | None = None
    # auto: bf16 where the hardware supports it, fp32 otherwise; fp16 is refused for T5.
    dtype: Precision = "auto"
    # Recompute activations in backward: ~30% slower, activation memory O(layers) -> O(1).
    gradient_checkpointing: bool = False
    # transformers' attention kernel: empty for its default (sdpa), or eager, sdpa,
    # flash_attention_2 (GPU, the flash-attn package): with data.packing, flash-attention's
    # varlen kernels cost sum(L^2) per packed row where sdpa's block mask costs (sum L)^2.
    attn_implementation: str = ""

    def validate(self) -> None:
        if self.dropout is not None:
            in_range("model.dropout", self.dropout, 0, 1, example=0.1)


# The data settings that change what a row becomes (or whether it is kept), besides the
# run's chat template: each source of a mixture may set its own.
TOKEN_SETTINGS = (
    "format",
    "messages_column",
    "tools_column",
    "use_chat_template",
    "train_on",
    "max_length",
    "source_column",
    "target_column",
    "prompt_template",
    "max_source_length",
    "max_target_length",
    "skip_invalid_rows",
)
# The data settings a mixture source may set for itself (unset: the data section's value).
MIXTURE_SOURCE_KEYS = (
    "train_file",
    "eval_file",
    "dataset",
    "train_split",
    "eval_split",
    *TOKEN_SETTINGS,
)


@dataclass
class MixtureSource(Validated):
    """One source of a weighted mixture: its data and the settings it does not share."""

    SECTION: ClassVar[str] = "data.mixture[]"

    # Its name in logs, metrics (eval_loss/<name>) and the prepared data; unset: the file's
    # stem or the dataset id.
    name: str | None = None
    # Its share of the mixture (of examples or tokens: data.mixture_weights), relative to the
    # other sources' weights; more than its size over-samples it.
    weight: float = 1.0
    train_file: str | None = None
    eval_file: str | None = None
    dataset: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    format: DataFormat | None = None
    messages_column: str | None = None
    tools_column: str | None = None
    use_chat_template: bool | None = None
    train_on: TrainOn | None = None
    max_length: int | None = None
    source_column: str | None = None
    target_column: str | None = None
    prompt_template: str | None = None
    max_source_length: int | None = None
    max_target_length: int | None = None
    skip_invalid_rows: bool | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.train_file:
            return Path(self.train_file).stem
        return str(self.dataset or "source").replace("/", "_")


@dataclass
class DataConfig(Validated):
    SECTION: ClassVar[str] = "data"

    # Local jsonl/json/csv/parquet file, or a hub dataset id (then train_split is used).
    train_file: str | None = None
    # Local file or hub dataset id for the periodic eval loss; empty disables eval.
    eval_file: str | None = None
    # Hub dataset id providing both splits (alternative to train_file/eval_file).
    dataset: str | None = None
    # Split of data.dataset to train on.
    train_split: str = "train"
    # Split of data.dataset for the periodic eval loss.
    eval_split: str = "validation"
    # text: a prompt (prompt_template over columns) and a target column; chat: a column of
    # conversations, lists of {role: system|user|assistant|tool, content, tool_calls,
    # reasoning_content} messages as transformers' chat templates take them (decoder-only models).
    format: DataFormat = "text"
    # chat: the column holding each row's conversation.
    messages_column: str = "messages"
    # chat: the column holding the tools a row's conversation may call (a list of JSON-schema
    # function definitions, or its JSON text), passed to the template; absent column: no tools.
    tools_column: str = "tools"
    # Decoder-only models: a Jinja file, or a built-in (chatml) for tokenizers that have no
    # chat template; empty: the tokenizer's own template (for a known family without
    # generation markers, TRL's marked training copy of it renders the training rows).
    chat_template: str = ""
    # The date a template that writes today's date renders (gpt-oss), YYYY-MM-DD; empty: the
    # day the run tokenises. Part of the run's identity: a resume on another day names it.
    template_date: str = ""
    # text format on a decoder-only model: render the prompt as the user turn and the target as
    # the assistant turn with the chat template (null: when the tokenizer has one; false: raw
    # concatenation of prompt and target).
    use_chat_template: bool | None = None
    # Loss on what the model writes in every assistant turn (reasoning, tool calls, content,
    # end of turn), on the final assistant turn only (last_assistant: agent traces), or on all.
    train_on: TrainOn = "assistant"
    # chat: tokens per conversation; a longer one keeps its turns up to the last assistant reply
    # that fits (never cut inside a turn), and one whose first reply does not fit is invalid.
    max_length: int = 1024
    # Decoder-only: concatenate each micro-batch's examples into one row (no padding), position
    # ids restarting per example, attention kept inside examples (checked at start-up).
    packing: bool = False
    # Column holding the input text (the dialogue).
    source_column: str = "dialogue"
    # Column holding the target text (the summary).
    target_column: str = "summary"
    # Prompt with one {placeholder} named like source_column (the seed tutorial's prompt).
    prompt_template: str = SEED_PROMPT
    # Prompt tokens kept; DialogSum dialogues are ~160 tokens median, so 512 truncates few.
    max_source_length: int = 512
    # Summary tokens kept (DialogSum summaries are ~25 tokens median).
    max_target_length: int = 128
    # Use only the first N eval examples (None: all); keeps periodic eval cheap.
    max_eval_examples: int | None = None
    # Global batches sorted together by length: larger packs tighter, smaller is more random.
    length_group_size: int = 50
    # Processes for tokenisation with datasets.map (results are cached by datasets).
    num_proc: int = 1
    # Rows whose text (prompt columns, target) is null, missing, empty or not a string:
    # false refuses the data naming the first such row; true skips them and says how many.
    skip_invalid_rows: bool = False
    # Where the prepared (tokenised) data lives: `clustertune-data prepare` writes it and
    # training reads it memory-mapped, never tokenising again; empty: a folder keyed by the
    # data's fingerprint under $CLUSTERTUNE_CACHE/prepared (~/.cache/clustertune/prepared).
    prepared_dir: str = ""
    # A weighted mixture of sources instead of train_file / dataset: a list of {name, weight,
    # train_file or dataset, eval_file, ...} (each may set its own format, columns, prompt and
    # template use; unset keys are the data section's). Drawn once from the seed: the same
    # examples whatever the cluster shape.
    mixture: list[MixtureSource] = field(default_factory=list)
    # What the weights share out: examples, or tokens (each source's examples drawn until its
    # share of the tokens is reached).
    mixture_weights: MixtureWeights = "examples"
    # Examples in the mixed training set per epoch; 0: as many as the sources hold together.
    mixture_examples: int = 0

    def validate(self) -> None:
        if self.format == "text":  # a chat dataset has no prompt or source column
            check_prompt_template(self.prompt_template)
            check_source_placeholder(self.prompt_template, self.source_column)
        elif self.use_chat_template is False:
            raise UserError(
                "data.format=chat is rendered with the chat template; remove "
                "data.use_chat_template=false (it is for data.format=text)."
            )
        if self.template_date:
            check_date("data.template_date", self.template_date)
        at_least("data.max_length", self.max_length, 2)
        at_least("data.max_source_length", self.max_source_length, 1)
        at_least("data.max_target_length", self.max_target_length, 1)
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise UserError(
                f"data.max_eval_examples={self.max_eval_examples} leaves an empty eval set; "
                "use a positive number, or null for all."
            )
        at_least("data.length_group_size", self.length_group_size, 1)
        at_least("data.num_proc", self.num_proc, 1)
        at_least("data.mixture_examples", self.mixture_examples, 0, "0: the sources' total")
        self._check_mixture()

    def _check_mixture(self) -> None:
        if not self.mixture:
            return
        if self.train_file or self.dataset:
            raise UserError(
                "data.mixture lists the training sources; remove data.train_file / data.dataset "
                "(put each file in a data.mixture entry)."
            )
        names = []
        for index, source in enumerate(self.mixture):
            key = f"data.mixture[{index}]"
            if not source.weight > 0:
                raise UserError(
                    f"{key}.weight={source.weight} must be positive (it is a share of the "
                    "mixture); remove the source instead of giving it no weight."
                )
            if not (source.train_file or source.dataset):
                raise UserError(f"{key} names no data: set its train_file or dataset.")
            names.append(source.label)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UserError(
                f"data.mixture: two sources are named '{duplicates[0]}'; give each a distinct name."
            )

    def source_configs(self) -> list[tuple[str, float, DataConfig]]:
        """(name, weight, its data settings) of each training source: the mixture's, or this
        section's own data as the one source "data"."""
        if not self.mixture:
            return [("data", 1.0, self)]
        out = []
        for source in self.mixture:
            values = {k: getattr(source, k) for k in MIXTURE_SOURCE_KEYS}
            own = {k: v for k, v in values.items() if v is not None}
            merged = replace(self, mixture=[], **own)
            if source.train_file or source.dataset:  # the other way of naming data is unset
                merged = replace(merged, train_file=source.train_file, dataset=source.dataset)
            out.append((source.label, source.weight, merged))
        return out


@dataclass
class TrainConfig(Validated):
    SECTION: ClassVar[str] = "train"

    # Optimizer steps; -1 means num_epochs passes over the training data.
    max_steps: int = -1
    # Epochs when max_steps is -1.
    num_epochs: int = 1
    # Examples per optimizer step = micro_batch_size x grad_accum_steps x world_size.
    global_batch_size: int = 32
    # Examples per forward pass on one rank, or auto: the largest that fits (all ranks agree,
    # worst-case lengths, forward+backward+optimizer step). grad_accum_steps is derived from it.
    micro_batch_size: int | Auto = 8
    # Token budget per micro-batch instead of an example count (0: off; or auto, the largest that
    # fits): a micro-batch holds as many whole examples as fit (padded rows x longest, or packed
    # length); the global batch stays global_batch_size examples, whatever the cluster shape.
    micro_batch_tokens: int | Auto = 0
    # auto: use at most (1 - margin) x the largest micro-batch that fitted.
    auto_batch_margin: float = 0.1
    # Peak learning rate (seed: 1e-5 full fine-tune, 1e-3 LoRA).
    learning_rate: float = 1e-5
    # Linear warmup from 0 to learning_rate.
    warmup_steps: int = 0
    # Decay after warmup, to 0 at the last step (constant: none).
    lr_schedule: LrSchedule = "linear"
    # AdamW weight decay (not applied to biases and norms).
    weight_decay: float = 0.0
    # Clip the global gradient norm to this (0 disables).
    max_grad_norm: float = 1.0
    # Eval loss every N optimizer steps (0: only before and after training).
    eval_every_steps: int = 0
    # Log a metrics line every N optimizer steps.
    log_every_steps: int = 10
    # Extra trackers for accelerate, e.g. [tensorboard]; metrics.jsonl is always written.
    report_to: list[str] = field(default_factory=list)
    # Adam's first-moment decay.
    adam_beta1: float = 0.9
    # Adam's second-moment decay.
    adam_beta2: float = 0.999
    # Added to Adam's denominator for numerical stability.
    adam_epsilon: float = 1e-8

    def validate(self) -> None:
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise UserError("set train.max_steps or train.num_epochs to a positive number.")
        if self.micro_batch_tokens != "auto":
            at_least("train.micro_batch_tokens", int(self.micro_batch_tokens), 0, "0: off")
        in_range("train.auto_batch_margin", self.auto_batch_margin, 0, 1, example=0.1)
        positive("train.learning_rate", self.learning_rate, example=1e-5)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.max_grad_norm", self.max_grad_norm, 0)
        at_least(
            "train.eval_every_steps", self.eval_every_steps, 0, "0: only before and after training"
        )
        at_least("train.log_every_steps", self.log_every_steps, 1)
        in_range("train.adam_beta1", self.adam_beta1, 0, 1, example=0.9)
        in_range("train.adam_beta2", self.adam_beta2, 0, 1, example=0.999)
        positive("train.adam_epsilon", self.adam_epsilon, example=1e-8)
        for tracker in self.report_to:
            check_tracker_name(tracker)

    def check_trackers_installed(self) -> None:
        """Refuse a tracker whose package is missing (accelerate would only warn and run
        without it). Not part of validate(): a run's config.yaml stays readable on a machine
        without that package (evaluation reads it)."""
        from accelerate.tracking import get_available_trackers

        available = {str(tracker) for tracker in get_available_trackers()}
        for tracker in self.report_to:
            if tracker != "all" and tracker not in available:
                raise UserError(
                    f"train.report_to: the {tracker} tracker needs the '{tracker}' package, which "
                    f"is not installed; pip install {tracker}, or remove it from train.report_to."
                )


@dataclass
class PeftConfig(Validated):
    SECTION: ClassVar[str] = "peft"

    # none: full fine-tune; lora: train low-rank adapters only.
    method: PeftMethod = "none"
    # LoRA rank: higher adds capacity and memory (seed: 32).
    r: int = 32
    # LoRA scale numerator; the update is scaled by alpha / r.
    alpha: int = 32
    # Dropout on the LoRA input (seed: 0.05).
    dropout: float = 0.05
    # Module names to adapt; empty means ["q", "v"] for T5 and peft's defaults otherwise.
    target_modules: list[str] = field(default_factory=list)
    # Also write final/merged/: the base model with the adapter merged in.
    merge_on_save: bool = False

    def validate(self) -> None:
        at_least("peft.r", self.r, 1)
        positive("peft.alpha", self.alpha, example=32)
        in_range("peft.dropout", self.dropout, 0, 1, example=0.05)


@dataclass
class CheckpointConfig(Validated):
    SECTION: ClassVar[str] = "checkpoint"

    # Save a resumable checkpoint every N optimizer steps (0: only when stopped by a signal).
    every_steps: int = 0
    # Complete checkpoints kept; older ones are pruned after a new one is complete.
    keep_last: int = 2

    def validate(self) -> None:
        at_least("checkpoint.every_steps", self.every_steps, 0, "0: only when stopped by a signal")
        at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass
class FinetuneConfig(Validated):
    # Everything the run writes: config.yaml, metrics.jsonl, checkpoints/, final/.
    output_dir: str = "outputs/run"
    # Seeds model init (LoRA), data order and dropout.
    seed: int = 42
    # auto: continue from the newest complete checkpoint in output_dir; never; or a path.
    resume: str = "auto"
    # Resume even if model, data or global batch changed since the checkpoint.
    allow_config_change: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
