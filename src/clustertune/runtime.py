"""The setup every recipe shares (training and evaluation): one owner, used by both.

    runtime = Runtime.resolve(model_name, requested_dtype, output_dir)   # no process group yet
    runtime.start(seed)                       # process group (gloo on CPU), count check, seed
    ds_config = runtime.deepspeed_config(micro_batch_size=8, grad_accum_steps=2, max_grad_norm=1.0)
    accelerator = runtime.make_accelerator(ds_config, report_to=[])
    runtime.write_resolved_config(cfg, "config.yaml", header)       # main process only

`resolve` is the boundary where user mistakes are found before any compute is spent: the
output folder is writable, the model config loads, the precision suits the model (fp16 is
refused for T5), and the DeepSpeed JSON named by the launch file can be completed by the
settings the recipe owns. `start` and `make_accelerator` are idempotent steps every rank runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustertune.config import write_resolved_config
from clustertune.deepspeed_config import fill_deepspeed_config, load_deepspeed_json, zero_stage
from clustertune.distributed import (
    build_accelerator,
    deepspeed_config_path,
    init_process_state,
    launched_world_size,
    leave_process_group,
)
from clustertune.fsdp import FSDPSettings, check_fsdp_settings, fsdp_settings
from clustertune.modeling import load_model_config, model_kind, resolve_dtype
from clustertune.storage import check_writable, remove_stale_probes


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output folder this process cannot write, before anything is computed."""
    remove_stale_probes(output_dir)
    check_writable(output_dir, f"output_dir '{output_dir}'")


def strategy_label(ds_config: dict | None, world_size: int, fsdp: Any = None) -> str:
    """How the model is spread over the ranks, for logs: ZeRO-N, FSDP2, DDP or single process."""
    if ds_config is not None:
        return f"ZeRO-{zero_stage(ds_config)}"
    if fsdp is not None:
        return fsdp.describe()
    return "DDP" if world_size > 1 else "single process"


@dataclass(kw_only=True)
class Runtime:
    output_dir: Path
    world_size: int  # from the launcher's environment, known before any process group
    model_config: Any  # transformers PretrainedConfig of model.name_or_path
    kind: str  # "seq2seq" (encoder-decoder) or "causal" (decoder-only)
    dtype: str  # resolved precision: "bf16", "fp32" or "fp16"
    # The DeepSpeed JSON of the launch file as written ("auto" entries kept until the
    # micro-batch size is known, e.g. after auto batch sizing); None without DeepSpeed.
    deepspeed_template: dict | None
    # The launch file's FSDP2 settings (fsdp.py: clustertune shards the model itself); None
    # without FSDP.
    fsdp: FSDPSettings | None = None
    # Set by start(): accelerate's PartialState (process index, device, main_process_first).
    process_state: Any = field(default=None, repr=False)
    # Set by make_accelerator(): the one Accelerator of this process.
    accelerator: Any = field(default=None, repr=False)

    @classmethod
    def resolve(cls, *, model_name: str, requested_dtype: str, output_dir: Path) -> Runtime:
        """Everything that can be checked without a process group, in one place."""
        check_output_dir(output_dir)
        world_size = launched_world_size()
        model_config = load_model_config(model_name)
        dtype = resolve_dtype(requested_dtype, model_config)
        path = deepspeed_config_path()
        template = load_deepspeed_json(path) if path else None
        if template is not None:  # reject a config no setting can complete, before compute
            fill_deepspeed_config(
                template,
                micro_batch_size=1,
                grad_accum_steps=1,
                world_size=world_size,
                max_grad_norm=1.0,
                dtype=dtype,
            )
        fsdp = fsdp_settings()
        if fsdp is not None:
            check_fsdp_settings(fsdp, dtype, model_config)
        return cls(
            output_dir=output_dir,
            world_size=world_size,
            model_config=model_config,
            kind=model_kind(model_config),
            dtype=dtype,
            deepspeed_template=template,
            fsdp=fsdp,
        )

    @property
    def is_deepspeed(self) -> bool:
        return self.deepspeed_template is not None

    @property
    def engine(self) -> str:
        """What shards and steps the model: deepspeed, fsdp2, or ddp (DDP or one process)."""
        return "deepspeed" if self.is_deepspeed else "fsdp2" if self.fsdp else "ddp"

    # ------------------------------------------------------------ every rank
    def start(self, seed: int) -> None:
        """Join the process group (before the Accelerator: auto batch sizing probes with it),
        check that accelerate sees the launcher's world size, seed every RNG. Idempotent."""
        if self.process_state is not None:
            return
        state = init_process_state(use_deepspeed=self.is_deepspeed)
        if state.num_processes != self.world_size:
            raise RuntimeError(
                f"accelerate sees {state.num_processes} processes, the launcher {self.world_size}"
            )
        from accelerate.utils import set_seed

        set_seed(seed)
        self.process_state = state

    def deepspeed_config(
        self, *, micro_batch_size: int, grad_accum_steps: int, max_grad_norm: float
    ) -> dict | None:
        """The launch file's DeepSpeed JSON with every "auto" filled; None without DeepSpeed."""
        if self.deepspeed_template is None:
            return None
        return fill_deepspeed_config(
            self.deepspeed_template,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            world_size=self.world_size,
            max_grad_norm=max_grad_norm,
            dtype=self.dtype,
        )

    def make_accelerator(self, ds_config: dict | None, *, report_to: list[str]) -> Any:
        """The one Accelerator of this process, built for the filled DeepSpeed config."""
        if self.accelerator is None:
            self.accelerator = build_accelerator(
                ds_config=ds_config,
                dtype=self.dtype,
                project_dir=str(self.output_dir),
                report_to=report_to,
                zero3_init=zero_stage(ds_config) == 3,
                fsdp=self.fsdp is not None,
            )
        return self.accelerator

    @property
    def is_main(self) -> bool:
        return self.process_state.is_main_process

    @property
    def process_index(self) -> int:
        return self.process_state.process_index

    @property
    def device(self) -> Any:
        return self.process_state.device

    def main_process_first(self) -> AbstractContextManager[None]:
        """Rank 0 runs the block first (tokenise and cache); the others then read the cache."""
        return self.process_state.main_process_first()

    def shutdown(self) -> None:
        """Every rank, last (after the final barrier): leave the process group cleanly."""
        if self.process_state is not None:
            leave_process_group()

    # ------------------------------------------------------------ main process only
    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def write_resolved_config(self, cfg: Any, filename: str, header: str) -> Path:
        """The resolved config, the run's single source of truth (main process only)."""
        path = self.output_dir / filename
        if self.is_main:
            write_resolved_config(cfg, path, header=header)
        return path
