"""Typed configs: nested dataclasses, YAML for values, `--section.key=value` overrides.

- checks.py    the rules: Literal choices, the Validated base (each section's validate()),
               range and prompt-template checks;
- finetune.py  the fine-tuning recipe's config (FinetuneConfig and its sections); the
               evaluation recipe's is clustertune.evaluation.config;
- parsing.py   `--config FILE` + dotted overrides through draccus, unknown keys with the
               nearest valid name, one-line errors, the resolved config written out.
"""

from clustertune.config.checks import (
    SEED_PROMPT,
    Auto,
    LrSchedule,
    PeftMethod,
    Precision,
    Validated,
    at_least,
    check_choice,
    check_prompt_template,
    check_source_placeholder,
    check_tracker_name,
    in_range,
    positive,
    template_fields,
)
from clustertune.config.finetune import (
    CheckpointConfig,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PeftConfig,
    TrainConfig,
)
from clustertune.config.parsing import (
    _field_paths,
    _unknown_key_error,
    config_from_dict,
    config_to_yaml,
    flat_config,
    load_yaml_mapping,
    parse_config,
    write_resolved_config,
)

__all__ = [
    "SEED_PROMPT",
    "Auto",
    "CheckpointConfig",
    "DataConfig",
    "FinetuneConfig",
    "LrSchedule",
    "ModelConfig",
    "PeftConfig",
    "PeftMethod",
    "Precision",
    "TrainConfig",
    "Validated",
    "_field_paths",
    "_unknown_key_error",
    "at_least",
    "check_choice",
    "check_prompt_template",
    "check_source_placeholder",
    "check_tracker_name",
    "config_from_dict",
    "config_to_yaml",
    "flat_config",
    "in_range",
    "load_yaml_mapping",
    "parse_config",
    "positive",
    "template_fields",
    "write_resolved_config",
]
