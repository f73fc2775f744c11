"""Many LoRA adapters of one base in one job: the base is loaded once, the adapters are loaded
into it with peft's multi-adapter API and switched per system, never merged.

- the keys that choose the adapters, and their folder names: adapter_keys.py;
- `load_adapters`: `PeftModel.from_pretrained(base, first, adapter_name=...)` then
  `load_adapter(...)` for the others: one base in memory however many adapters;
- `System`: one model evaluated (the run itself, or one adapter, or the base with the
  adapters disabled): its name, folder, the config its rouge.json and config.yaml record (as
  if it had been evaluated alone) and how to make it the one `generate` runs;
- `single_system`, `adapter_systems`, `probe_system`: the systems of a job, and the one
  batch_size auto probes with;
- `write_comparison`: comparison.md / comparison.png of all systems (compare.compare_runs).

Why switching instead of merging: merging adapter k into the base would need the base
restored (unmerged, with rounding) before adapter k+1; with the adapters kept beside the base
(`set_adapter`, `disable_adapter()`) the base weights are never written, so each system runs
on the exact weights a separate job would load. In fp32 an unmerged adapter generates the
same text as the merged one (tests/test_multi_adapter.py checks it against single jobs,
which merge); in bf16 W + BA rounded once can differ from W x + B(A x) in the last bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustertune.errors import UserError
from clustertune.evaluation.adapter_keys import BASE_NAME

if TYPE_CHECKING:
    from clustertune.evaluation.config import EvaluateConfig


def adapter_load_error(error: Exception, key: str, adapter_path: str, base: str) -> UserError:
    """A shape mismatch means the adapter was made for another base: one sentence, not a traceback."""
    first = str(error).strip().splitlines()
    detail = next(
        (line.strip() for line in first if "size mismatch" in line),
        first[0] if first else type(error).__name__,
    )
    return UserError(
        f"{key}: the adapter in '{adapter_path}' does not fit base model '{base}' ({detail[:300]}); "
        "it was made for another base: set model.name_or_path to that base."
    )


def load_adapters(model: Any, paths: Sequence[str], names: Sequence[str], base: str) -> Any:
    """Every adapter into one PeftModel around `model`, under its name; none merged."""
    from peft import PeftModel

    peft_model = None
    for path, name in zip(paths, names, strict=True):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as error:
            raise adapter_load_error(error, "model.adapter_paths", path, base) from None
    return peft_model


@dataclass
class System:
    """One model that a job evaluates and writes: the run itself, one adapter, or the base."""

    name: str | None  # None: the single evaluation of a job, written into output_dir itself
    cfg: EvaluateConfig  # as if evaluated alone: what its rouge.json and config.yaml record
    output_dir: Path
    activate: Callable[[], contextlib.AbstractContextManager[Any]]  # makes it the one generated
    predictions: list[str] = field(default_factory=list)  # set by Evaluator.generate
    # chat sets: each generated reply parsed (content, reasoning, tool calls); else empty
    replies: list[dict[str, Any]] = field(default_factory=list)
    throughput: dict[str, Any] = field(default_factory=dict)


def single_system(cfg: EvaluateConfig, output_dir: Path) -> System:
    return System(None, cfg, output_dir, contextlib.nullcontext)


def adapter_systems(cfg: EvaluateConfig, output_dir: Path, generator: Any) -> list[System]:
    """The base first (with include_base: the others' change is against it), then the adapters
    in the order given. Each system's cfg is the single evaluation that reproduces it."""
    model = cfg.model
    alone = replace(model, adapter_paths=None, adapter_names=None, include_base=False)

    def system(name: str, adapter_path: str | None, activate: Callable[[], Any]) -> System:
        sub = output_dir / name
        own = replace(cfg, output_dir=str(sub), model=replace(alone, adapter_path=adapter_path))
        return System(name, own, sub, activate)

    def switch_to(name: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
        @contextlib.contextmanager
        def active() -> Iterator[None]:
            # inference_mode: peft would otherwise mark the active adapter trainable.
            generator.set_adapter(name, inference_mode=True)
            yield

        return active

    systems = [system(BASE_NAME, None, generator.disable_adapter)] if model.include_base else []
    return systems + [
        system(name, path, switch_to(name))
        for name, path in zip(model.adapter_names, model.adapter_paths, strict=True)
    ]


def probe_system(systems: Sequence[System], generator: Any) -> System:
    """batch_size auto searches once for all systems (they share the base's shapes), with the
    adapter of the largest rank active: its unmerged LoRA activations are the largest."""
    adapters = [s for s in systems if s.cfg.model.adapter_path is not None]
    return max(adapters, key=lambda s: generator.peft_config[s.name].r)


def adapter_ranks(generator: Any) -> dict[str, int]:
    return {name: config.r for name, config in generator.peft_config.items()}


def write_comparison(systems: Sequence[System], output_dir: Path) -> str:
    """comparison.md and comparison.png of every system of the job, into output_dir."""
    from clustertune.evaluation.compare import compare_runs

    return compare_runs(
        [str(s.output_dir) for s in systems],
        [str(s.name) for s in systems],
        output_dir,
        checked_out=False,
    )
