"""The keys that choose a multi-adapter job's adapters (model.adapter_paths and the keys that go
with it) and the folder name each adapter's results get under output_dir; adapters.py loads
and runs them.

- `check_adapter_keys`: the model keys that cannot go together (EvalModelConfig.validate);
- `default_names`, `check_names`: one folder name per adapter under output_dir (resolve_config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clustertune.errors import UserError
from clustertune.run_folder import (
    AUTO_BATCH_FILE,
    COMPARISON_MD,
    COMPARISON_PNG,
    CONFIG_FILE,
    FINAL_DIR,
)

BASE_NAME = "base"  # model.include_base: the base model's folder and label
# Files a multi-adapter job writes into output_dir itself: no adapter folder may take a name.
_TOP_LEVEL_FILES = (CONFIG_FILE, AUTO_BATCH_FILE, COMPARISON_MD, COMPARISON_PNG)


def check_adapter_keys(
    adapter_path: str | None,
    adapter_paths: Sequence[str] | None,
    adapter_names: Sequence[str] | None,
    include_base: bool,
) -> None:
    """The model keys of adapters that go together only one way; checked before anything runs."""
    if adapter_paths is not None and adapter_path is not None:
        raise UserError(
            "model.adapter_path and model.adapter_paths are both set; use adapter_path for one "
            "adapter (merged) or adapter_paths for several (switched), not both."
        )
    if adapter_paths is not None and not adapter_paths:
        raise UserError(
            "model.adapter_paths is empty; list the adapter folders, e.g. [run_a/final]."
        )
    if adapter_names is not None and adapter_paths is None:
        raise UserError(
            "model.adapter_names names the folders of model.adapter_paths, which is unset."
        )
    if adapter_names is not None and len(adapter_names) != len(adapter_paths or []):
        raise UserError(
            f"model.adapter_names has {len(adapter_names)} names for {len(adapter_paths or [])} "
            "model.adapter_paths; give one name per adapter (or none: the folder names)."
        )
    if include_base and adapter_paths is None:
        raise UserError(
            "model.include_base needs model.adapter_paths; to evaluate the base alone set only "
            "model.name_or_path."
        )


def default_names(adapter_paths: Sequence[str]) -> list[str]:
    """Each adapter folder's name; a training run's final/ is named after its run folder."""
    names = []
    for path in adapter_paths:
        folder = Path(path).expanduser().resolve()
        names.append(folder.parent.name if folder.name == FINAL_DIR else folder.name)
    return names


def check_names(names: Sequence[str], include_base: bool) -> None:
    """Names become folders under output_dir: plain, distinct, and none the base's folder."""
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(
                f"model.adapter_names: '{name}' is not a plain folder name; use e.g. lora_r8."
            )
        if name in _TOP_LEVEL_FILES:
            raise UserError(
                f"model.adapter_names: '{name}' is a file the job writes into output_dir; rename it."
            )
    taken = [*names, *([BASE_NAME] if include_base else [])]
    duplicate = next((name for name in taken if taken.count(name) > 1), None)
    if duplicate is not None:
        why = (
            f" (model.include_base writes the base model under {BASE_NAME}/)"
            if include_base and duplicate == BASE_NAME
            else ""
        )
        raise UserError(
            f"model.adapter_names: '{duplicate}' names two systems{why}; each writes "
            f"<output_dir>/<name>/: set distinct model.adapter_names, one per adapter."
        )
