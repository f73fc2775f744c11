"""The evaluation config: `EvaluateConfig` and its sections, their value checks, and resolution.

- `EvalModelConfig`, `EvalDataConfig`, `EvaluateConfig` (with settings.py's
  `GenerationSettings`, `RougeSettings`): the keys of recipes/evaluate.py (`--help` lists
  them). Where an eval default is the training default (seed, dtype, prompt template, source
  column, truncation, chat format, ...), it is read from `clustertune.config`, so the two
  cannot drift apart. Enumerated keys are `Literal`s, checked by
  `clustertune.config.Validated` when a section is built (one line naming the key and its
  choices).
- `resolve_config`: fills every unset key, before any model is loaded or process group made:
  from `run_dir` (`_from_run_dir`: the run's final/, its tokenizer and the prompt settings
  final/ was trained with, FINAL_PROMPT_KEYS), from the adapter (`adapter_base`: the base it
  records; for adapter_paths `_adapter_set`: one base, one folder name each), else the
  training defaults; then `_check_values` checks what needs the resolved values
  (`_check_data`: eval data given, the prompt's placeholder). Each section's own values are
  checked by its `validate()` when the section is built, before anything is resolved.
- `generate_kwargs` (settings.py): the generation settings as `model.generate` keyword arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from clustertune.config import (
    SEED_PROMPT,
    Auto,
    FinetuneConfig,
    Precision,
    Validated,
    at_least,
    check_choice,
    check_prompt_template,
    check_source_placeholder,
    config_to_yaml,
    in_range,
    parse_config,
)
from clustertune.config.checks import DataFormat, check_date
from clustertune.errors import UserError
from clustertune.evaluation.adapter_keys import check_adapter_keys, check_names, default_names
from clustertune.evaluation.output_dir import check_earlier_results, check_not_in_a_run
from clustertune.evaluation.settings import (  # noqa: F401  (re-exported: the config's sections)
    GenerationSettings,
    HeadlineProtocol,
    RougeSettings,
    generate_kwargs,
)
from clustertune.run_folder import FINAL_MARKER, RunFolder
from clustertune.run_identity import FINAL_PROMPT_KEYS

# The training defaults that eval defaults repeat are read from here, not written again.
_TRAINING = FinetuneConfig()


@dataclass
class EvalModelConfig(Validated):
    SECTION: ClassVar[str] = "model"

    # Base model, or a full fine-tune (a run's final/). With run_dir: taken from the run.
    # Unset with model.adapter_path: the adapter's own base model.
    name_or_path: str | None = None
    # A LoRA adapter folder (adapter_config.json) applied to name_or_path and merged for speed.
    adapter_path: str | None = None
    # The tokenizer (and its chat template). Unset: the run's final/ with run_dir (saved by
    # training, with the template it trained with), else adapter_path where it holds one,
    # else name_or_path.
    tokenizer: str | None = None
    # Allow a base whose name differs from the one the adapter records (e.g. a local copy of
    # the same hub model); shapes are still checked when the adapter is loaded.
    allow_base_mismatch: bool = False
    # auto | bf16 | fp32 | fp16 (fp16 refused for T5). auto: bf16 where supported, else fp32.
    dtype: Precision = _TRAINING.model.dtype
    # Several LoRA adapter folders of one base, evaluated in one job: the base is loaded once
    # and the adapters switched (not merged); each writes <output_dir>/<name>/, and
    # comparison.md/.png of all of them go to output_dir. Not with adapter_path or run_dir.
    adapter_paths: list[str] | None = None
    # One folder name per adapter_paths entry. Unset: each adapter folder's name (a training
    # run's final/: the run folder's name).
    adapter_names: list[str] | None = None
    # With adapter_paths: also evaluate the base model itself (adapters disabled), as base/.
    include_base: bool = False

    def validate(self) -> None:
        check_adapter_keys(
            self.adapter_path, self.adapter_paths, self.adapter_names, self.include_base
        )


@dataclass
class EvalDataConfig(Validated):
    SECTION: ClassVar[str] = "data"

    # Local jsonl/json/csv/parquet file, or a hub dataset id (then split is used).
    eval_file: str | None = None
    # Hub dataset id (alternative to eval_file).
    dataset: str | None = None
    # Split of the hub dataset.
    split: str = "test"
    # Columns holding the reference summaries; every one is scored (best, mean, first).
    # Unset: [summary] (text); the content of each conversation's last assistant turn (chat).
    reference_columns: list[str] | None = None
    # Column with a unique example id; unset: `id`, else `fname`, else the row index.
    id_column: str | None = None
    # text | chat. chat: each row's conversation (messages_column) up to its last assistant
    # turn is the prompt, rendered with the chat template (decoder-only models). Unset: the
    # training run's with run_dir, else text.
    format: str | None = None
    # chat: the column of conversations. Unset: the training run's with run_dir, else messages.
    messages_column: str | None = None
    # chat: the column of the tools each conversation may call. Unset: the training run's with
    # run_dir, else tools (absent: no tools).
    tools_column: str | None = None
    # The date a template that writes today's date renders (YYYY-MM-DD). Unset: the date the
    # training run rendered with run_dir, else today.
    template_date: str | None = None
    # Decoder-only: a Jinja file, or a built-in (chatml), replacing the tokenizer's template;
    # empty: the tokenizer's own (with run_dir: the one final/ was trained with).
    chat_template: str = ""
    # text on a decoder-only model: the prompt rendered as the user turn with the chat
    # template and its generation prompt (null: when the tokenizer has a template; false: the
    # raw prompt). Unset with run_dir: the training run's.
    use_chat_template: bool | None = None
    # chat: tokens per conversation in training; a prompt leaving no room for its reply within
    # it is invalid. Unset: the training run's with run_dir, else 1024.
    max_length: int | None = None
    # Unset: the training run's value with run_dir, else "dialogue".
    source_column: str | None = None
    # Unset: the training run's prompt with run_dir, else the seed tutorial's prompt.
    prompt_template: str | None = None
    # Prompt tokens kept. Unset: the training run's value with run_dir, else 512.
    max_source_length: int | None = None
    # Evaluate only the first N examples (None: all).
    max_examples: int | None = None
    # Rows whose prompt text is null, missing, empty or not a string, that have no reference,
    # or (chat) whose conversation cannot be used: false refuses the data naming the first
    # one; true skips them and says how many.
    skip_invalid_rows: bool = False

    def validate(self) -> None:
        if self.format is not None:
            check_choice("data.format", self.format, DataFormat)
        if self.format == "chat" and self.use_chat_template is False:
            raise UserError(
                "data.format=chat is rendered with the chat template; remove "
                "data.use_chat_template=false (it is for data.format=text)."
            )
        if self.max_length is not None:
            at_least("data.max_length", self.max_length, 2)
        if self.template_date:
            check_date("data.template_date", self.template_date)
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template)
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(
                f"data.max_examples={self.max_examples} leaves an empty eval set; use a positive "
                "number or null."
            )
        if self.max_source_length is not None:
            at_least("data.max_source_length", self.max_source_length, 1)


@dataclass
class EvaluateConfig(Validated):
    # Everything the evaluation writes: config.yaml, predictions.jsonl, rouge.json.
    output_dir: str = "outputs/eval"
    # A training output_dir: the model is its final/ (or its base + final/ as LoRA adapter),
    # the tokenizer final/'s, and the unset prompt keys (data.format, messages_column,
    # use_chat_template, max_length, source_column, prompt_template, max_source_length) the run's.
    run_dir: str | None = None
    # Seeds sampling (if on) and the bootstrap of the confidence intervals.
    seed: int = _TRAINING.seed
    # Prompts per generate call on one rank; memory grows with batch x (prompt + new tokens).
    # auto: the largest that fits generating max_new_tokens (x num_beams) for the longest
    # prompt, agreed by all ranks, minus auto_batch_margin; cached in <output_dir>/auto_batch.json.
    batch_size: int | Auto = 16
    # batch_size auto: use at most (1 - margin) x the largest batch that fitted.
    auto_batch_margin: float = _TRAINING.train.auto_batch_margin
    # batch_size auto: search no further than this (and never beyond the number of examples).
    auto_batch_max: int = 256
    # Batch prompts of similar length (longest first): far less padding. false: dataset order.
    sort_by_length: bool = True
    # Bootstrap resamples for the 95 percent confidence intervals (1000: ~0.1 s per 1,000 examples).
    num_bootstrap: int = 1000
    # Replace the results of an earlier evaluation in output_dir that was made with other
    # settings (false: refused, naming the settings that differ; the same settings: replaced).
    overwrite: bool = False
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    rouge: RougeSettings = field(default_factory=RougeSettings)

    def validate(self) -> None:
        in_range("auto_batch_margin", self.auto_batch_margin, 0, 1, example=0.1)
        if self.batch_size != "auto":
            at_least("batch_size", int(self.batch_size), 1)
        at_least("auto_batch_max", self.auto_batch_max, 1)
        at_least("num_bootstrap", self.num_bootstrap, 1)
        if self.run_dir is not None and self.model.adapter_paths is not None:
            # run_dir names one model (and its prompt): which of them would it apply to?
            raise UserError(
                "run_dir and model.adapter_paths both name the model; set only one of them "
                "(list the run's final/ in model.adapter_paths)."
            )


# ------------------------------------------------------- resolving the model before compute


def _same_model(a: str, b: str) -> bool:
    """Hub ids compare as strings; local folders by their resolved path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_base(adapter_path: str, key: str = "model.adapter_path") -> str:
    """The base model an adapter was trained on, read from its adapter_config.json; `key` is
    the config key the errors name."""
    folder = Path(adapter_path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{key}: '{adapter_path}' does not exist; give the adapter folder "
            "(a LoRA run's final/, with adapter_config.json)."
        )
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"{key}: '{adapter_path}' has no adapter_config.json, so it is not a "
            "LoRA adapter; for a full fine-tune set model.name_or_path to it instead."
        )
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as error:
        raise UserError(f"{key}: {config_file} is not valid JSON ({error}).") from None
    if not base:
        raise UserError(
            f"{key}: {config_file} names no base_model_name_or_path; set model.name_or_path."
        )
    return str(base)


def _unset_or(value: Any, default: Any) -> Any:
    return default if value is None else value


_NOT_RECORDED = object()  # a key the marker lacks (null is a value: use_chat_template auto)


def _trained_settings(run: Path, final: Path) -> dict[str, Any]:
    """What final/ was trained with: the base model and the FINAL_PROMPT_KEYS, read from its
    marker (or the fingerprint it records). config.yaml is read only for a marker without
    them (runs made before the marker recorded them): it describes the last launch into the
    folder, which need not be the one that wrote final/."""
    marker = json.loads((final / FINAL_MARKER).read_text())
    recorded_fingerprint = marker.get("fingerprint", {})

    def recorded(name: str, key: str) -> Any:
        return marker.get(name, recorded_fingerprint.get(key, _NOT_RECORDED))

    settings = {name: recorded(name, key) for name, key in FINAL_PROMPT_KEYS.items()}
    settings["base_model"] = recorded("base_model", "model.name_or_path")
    if settings["base_model"] is None:
        settings["base_model"] = _NOT_RECORDED
    if any(value is _NOT_RECORDED for value in settings.values()):
        config_file = RunFolder(run).config
        if not config_file.is_file():
            raise UserError(
                f"run_dir: '{run}' has no config.yaml and its final/{FINAL_MARKER} does not "
                "record the prompt settings; set data.prompt_template, data.source_column and "
                "data.max_source_length (and model.name_or_path for an adapter) explicitly."
            )
        trained = parse_config(FinetuneConfig, ["--config", str(config_file)])
        from_config = {
            name: getattr(trained.data, key.split(".", 1)[1])
            for name, key in FINAL_PROMPT_KEYS.items()
        }
        from_config["base_model"] = trained.model.name_or_path
        settings = {
            name: from_config[name] if value is _NOT_RECORDED else value
            for name, value in settings.items()
        }
    return settings


def _from_run_dir(cfg: EvaluateConfig) -> EvaluateConfig:
    """Take the model and (where unset) the prompt settings from a finished training run."""
    run = Path(cfg.run_dir).expanduser()
    config_file, final = RunFolder(run).config, RunFolder(run).final
    if not run.is_dir():
        raise UserError(
            f"run_dir: '{cfg.run_dir}' does not exist; give a training output_dir (config.yaml, final/)."
        )
    if not (final / FINAL_MARKER).is_file():
        if not config_file.is_file():
            raise UserError(
                f"run_dir: '{cfg.run_dir}' has no config.yaml, so it is not a clustertune training output_dir."
            )
        raise UserError(
            f"run_dir: '{cfg.run_dir}' has no complete final/ ({FINAL_MARKER} missing): the training has "
            "not finished; rerun its command to finish it, or evaluate another run."
        )
    trained = _trained_settings(run, final)
    is_adapter = (final / "adapter_config.json").is_file()
    model_name = trained["base_model"] if is_adapter else str(final)
    if cfg.model.adapter_path is not None and not (
        is_adapter and _same_model(cfg.model.adapter_path, str(final))
    ):
        raise UserError(
            f"model.adapter_path='{cfg.model.adapter_path}' and run_dir='{cfg.run_dir}' both name a model; "
            "set only one of them."
        )
    # final/ holds the tokenizer training used, with the chat template it trained with.
    saved_tokenizer = (final / "tokenizer_config.json").is_file()
    model = replace(
        cfg.model,
        name_or_path=model_name,
        adapter_path=str(final) if is_adapter else None,
        tokenizer=_unset_or(cfg.model.tokenizer, str(final) if saved_tokenizer else None),
    )
    data_cfg = cfg.data
    data = replace(
        data_cfg,
        **{name: _unset_or(getattr(data_cfg, name), trained[name]) for name in FINAL_PROMPT_KEYS},
    )
    return replace(cfg, model=model, data=data)


def _adapter_set(model: EvalModelConfig) -> tuple[EvalModelConfig, str]:
    """model.adapter_paths: every folder an adapter, all of one base (returned), and one
    distinct folder name each (filled from the folder names where unset)."""
    paths = model.adapter_paths or []
    bases = [adapter_base(path, "model.adapter_paths") for path in paths]
    for path, base in zip(paths[1:], bases[1:], strict=True):
        if not _same_model(base, bases[0]):
            raise UserError(
                f"model.adapter_paths: '{paths[0]}' was trained on base '{bases[0]}' but '{path}' "
                f"on base '{base}'; one job evaluates adapters of one base: run one job per base."
            )
    names = model.adapter_names if model.adapter_names is not None else default_names(paths)
    check_names(names, model.include_base)
    return replace(model, adapter_names=list(names)), bases[0]


def resolve_config(cfg: EvaluateConfig) -> tuple[EvaluateConfig, list[str]]:
    """Fill every unset key (from run_dir, the adapter, or the defaults) and check the inputs
    that need no model and no process group. Returns the resolved config and notes to print."""
    notes: list[str] = []
    check_not_in_a_run(cfg.output_dir)
    if cfg.run_dir is not None:
        previous = cfg.model.name_or_path
        cfg = _from_run_dir(cfg)
        if previous is not None and not _same_model(previous, cfg.model.name_or_path or ""):
            notes.append(
                f"run_dir sets the model: model.name_or_path {previous} -> {cfg.model.name_or_path}"
            )
    model, recorded_base, adapters = cfg.model, None, ""
    if model.adapter_path is not None:
        recorded_base = adapter_base(model.adapter_path)
        adapters = f"model.adapter_path: the adapter in '{model.adapter_path}' was"
    elif model.adapter_paths is not None:
        model, recorded_base = _adapter_set(model)
        adapters = "model.adapter_paths: the adapters were"
    if recorded_base is not None:
        if model.name_or_path is None:
            model = replace(model, name_or_path=recorded_base)
        elif not _same_model(model.name_or_path, recorded_base):
            if not model.allow_base_mismatch:
                raise UserError(
                    f"{adapters} trained on base "
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
    if model.tokenizer is None:  # a LoRA run's final/ saves the tokenizer beside the adapter
        adapter = Path(model.adapter_path or "").expanduser()
        saved = model.adapter_path is not None and (adapter / "tokenizer_config.json").is_file()
        model = replace(model, tokenizer=model.adapter_path if saved else model.name_or_path)
    cfg = replace(cfg, model=model, data=_data_defaults(cfg.data))
    _check_values(cfg)
    check_earlier_results(cfg.output_dir, settings_of(cfg), overwrite=cfg.overwrite)
    return cfg, notes


def settings_of(cfg: EvaluateConfig) -> dict[str, Any]:
    """The resolved config as its config.yaml records it."""
    import yaml

    return yaml.safe_load(config_to_yaml(cfg))


def _data_defaults(data_cfg: EvalDataConfig) -> EvalDataConfig:
    """Without run_dir (or for keys a run does not set), the training defaults: the seed
    tutorial's prompt, text format. use_chat_template stays null (when the tokenizer has a
    template: known once it is loaded) and a chat set's reference_columns null (the last
    assistant turn)."""
    training = _TRAINING.data
    data_format = _unset_or(data_cfg.format, training.format)
    references = data_cfg.reference_columns
    if references is None and data_format == "text":
        references = [training.target_column]
    return replace(
        data_cfg,
        format=data_format,
        messages_column=_unset_or(data_cfg.messages_column, training.messages_column),
        tools_column=_unset_or(data_cfg.tools_column, training.tools_column),
        template_date=_unset_or(data_cfg.template_date, training.template_date),
        max_length=_unset_or(data_cfg.max_length, training.max_length),
        reference_columns=references,
        source_column=_unset_or(data_cfg.source_column, training.source_column),
        prompt_template=_unset_or(data_cfg.prompt_template, SEED_PROMPT),
        max_source_length=_unset_or(data_cfg.max_source_length, training.max_source_length),
    )


# ------------------------------------------------------------------- value checks


def _check_data(data_cfg: EvalDataConfig) -> None:
    """The `data` section, resolved (source_column, prompt_template, max_source_length set)."""
    if not (data_cfg.eval_file or data_cfg.dataset):
        raise UserError(
            "no eval data: set data.eval_file (a local file or hub id) or data.dataset with data.split."
        )
    if data_cfg.eval_file and data_cfg.dataset:
        raise UserError("set only one of data.eval_file and data.dataset.")
    if data_cfg.reference_columns is not None and not data_cfg.reference_columns:
        raise UserError(
            "data.reference_columns is empty; list the reference column(s), e.g. [summary]"
            + (", or unset it for the last assistant turn." if data_cfg.format == "chat" else ".")
        )
    if data_cfg.format != "chat":  # a conversation has no prompt template or source column
        check_source_placeholder(data_cfg.prompt_template, data_cfg.source_column)


def _check_values(cfg: EvaluateConfig) -> None:
    """The checks that need the resolved config (eval data given, the prompt's placeholder
    for the resolved source column). Each section's own values are checked by its validate()
    when it is built, from YAML, the command line or code, and again for the resolved values
    (built with `replace`); the enumerated keys (model.dtype, batch_size: a number or auto)
    by `Validated`."""
    _check_data(cfg.data)
