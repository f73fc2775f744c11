"""The tokenised splits a fine-tuning run trains on and measures its eval loss on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune import data as data_lib
from clustertune.config import FinetuneConfig, template_fields
from clustertune.errors import UserError
from clustertune.runtime import Runtime


@dataclass
class TrainData:
    """The tokenised splits and the collator that turns rows into padded tensors."""

    train: Any  # datasets.Dataset with input_ids, labels, num_source/target_tokens
    eval: Any | None  # the same for the periodic eval loss; None disables it
    collator: data_lib.Collator


def load_training_data(cfg: FinetuneConfig, runtime: Runtime, tokenizer: Any) -> TrainData:
    """Load and tokenise the training (and eval-loss) split; rank 0 first, the others read
    the datasets cache. Refuses a training set smaller than one global batch."""
    data_cfg = cfg.data
    required = [*template_fields(data_cfg.prompt_template), data_cfg.target_column]
    spec = data_lib.TokenizeSpec(
        runtime.kind,
        data_cfg.prompt_template,
        data_cfg.target_column,
        data_cfg.max_source_length,
        data_cfg.max_target_length,
    )
    train_source = data_cfg.train_file or data_cfg.dataset
    eval_source = data_cfg.eval_file or (
        data_cfg.dataset if data_cfg.dataset and not data_cfg.train_file else None
    )

    def load(source: str, split: str, key: str) -> Any:  # key: the setting that named it
        return data_lib.load_split(
            source,
            split=split,
            required_columns=required,
            what=key if getattr(data_cfg, key.split(".")[1]) else "data.dataset",
            skip_invalid_rows=data_cfg.skip_invalid_rows,
        )

    with runtime.main_process_first():  # rank 0 tokenises and caches; the others read it
        train_rows = load(train_source, data_cfg.train_split, "data.train_file")
        train = data_lib.tokenize_dataset(train_rows, tokenizer, spec, data_cfg.num_proc)
        evaluation = None
        if eval_source:
            eval_rows = load(eval_source, data_cfg.eval_split, "data.eval_file")
            if data_cfg.max_eval_examples:
                eval_rows = eval_rows.select(range(min(data_cfg.max_eval_examples, len(eval_rows))))
            evaluation = data_lib.tokenize_dataset(eval_rows, tokenizer, spec, data_cfg.num_proc)
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
    collator = data_lib.Collator(tokenizer.pad_token_id, decoder_start)
    return TrainData(train=train, eval=evaluation, collator=collator)
