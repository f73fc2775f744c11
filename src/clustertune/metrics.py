"""metrics.jsonl (main process only), peak memory, and the end-of-run plot."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clustertune.atomicio import append_jsonl, atomic_path, read_jsonl, write_jsonl_atomic


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class ThroughputWindow:
    """Real (non-pad) tokens, padded slots and samples since the last metrics record."""

    tokens: float = 0.0
    slots: float = 0.0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {
            "tokens_per_second": self.tokens / elapsed,
            "samples_per_second": self.samples / elapsed,
            "padding_efficiency": self.tokens / max(1.0, self.slots),
        }


class MetricsLog:
    """Append-only JSON lines. On resume from step N, records after N are dropped first:
    those steps are trained again and would otherwise appear twice."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_jsonl(self.path, record)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [record for record in read_jsonl(self.path) if record.get("step", 0) <= step]
        write_jsonl_atomic(self.path, kept)

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []


def plot_training(records: list[dict[str, Any]], path: Path) -> None:
    """Loss and real tokens/s against optimizer step, as a PNG next to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (mean per target token)")
    ax_loss.legend()
    speed = [r for r in train if "tokens_per_second" in r]
    ax_speed.plot([r["step"] for r in speed], [r["tokens_per_second"] for r in speed])
    ax_speed.set_xlabel("optimizer step")
    ax_speed.set_ylabel("real (non-pad) tokens / s, all ranks")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
