"""`train.micro_batch_size: auto` — the largest micro-batch that fits, agreed by all ranks.

What the common tools get wrong: the HF Trainer's auto_find_batch_size raises under
DeepSpeed/FSDP (transformers PR #29058), and accelerate's find_executable_batch_size searches
on each rank alone, with no agreement between ranks, and shrinks by 0.9 per OOM. Here:
- every candidate is probed with the worst-case shapes the data pipeline can produce (the
  longest tokenised source and target, together in every row) through forward, backward AND
  an optimizer step (Adam allocates its states on the first step);
- under DeepSpeed the engine is built for each candidate (so ZeRO partitions, buckets and
  offload are what the real run gets) and destroyed afterwards;
- each probe is split into phases with an all-reduce(MIN) of "it fitted" after every phase,
  so all ranks take the same path and stay in step for the collectives of the next phase;
- the search doubles until a failure, then bisects: ~2 log2(limit) probes;
- the result is cached in <output_dir>/auto_batch.json under a key of everything that changes
  memory, so a restarted or requeued job does not search again.

Limitation, by design: an out-of-memory error raised on only some ranks *inside* a ZeRO
collective (mid-backward) cannot be recovered by any framework; identical shapes on every
rank make OOMs symmetric on identical GPUs, and the margin keeps the run away from the edge.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clustertune.atomicio import write_json_atomic
from clustertune.errors import UserError

OOM_TEST_ENV = "CLUSTERTUNE_TEST_OOM_ABOVE"  # test-only: "4,2" = rank 0 fits <= 4, rank 1 <= 2


@dataclass
class SearchResult:
    largest_fitting: int  # the largest size that fitted on every rank
    chosen: int  # after the margin (and, for training, the global batch) is applied
    grad_accum_steps: int  # global_batch_size / (chosen x world_size); 1 for generation
    probes: list[dict[str, Any]] = field(default_factory=list)  # one record per size tried
    worst_case_shape: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False  # read from <output_dir>/auto_batch.json, no probe was run
    note: str = ""  # why `chosen` is below what the margin allows, if it is

    def log_line(self, what: str, margin: float, detail: str = "") -> str:
        """e.g. "auto micro-batch: largest fitting 16, chosen 8 (margin 10%), ...; from cache"."""
        how = (
            "from cache"
            if self.cached
            else f"searched {len(self.probes)} sizes in {self.seconds:.1f} s"
        )
        return (
            f"auto {what}: largest fitting {self.largest_fitting}, chosen {self.chosen} "
            f"(margin {margin:.0%}){detail}; {how}" + (f"; {self.note}" if self.note else "")
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# What a probe runs for one candidate size: (run the step on a batch, optimizer step, cleanup).
# Generation passes its generate call as the first and no-ops for the other two.
ProbeSteps = tuple[Callable[[dict[str, torch.Tensor]], Any], Callable[[], Any], Callable[[], Any]]
# The choice made from the largest fitting size: (chosen, grad_accum_steps, note).
Choice = tuple[int, int, str]


def search_largest(fits: Callable[[int], bool], limit: int) -> tuple[int, list[int]]:
    """Largest n in [1, limit] with fits(n), assuming fits is monotone. Grow by doubling, then
    bisect between the last success and the first failure. Returns (n, sizes probed); n = 0
    when even 1 does not fit."""
    probed: list[int] = []

    def check(n: int) -> bool:
        probed.append(n)
        return fits(n)

    good, bad, n = 0, None, 1
    while n <= limit:
        if not check(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        if good == limit:
            return good, probed
        bad = limit + 1  # every doubling fitted; the next one passed the limit
    while bad - good > 1:
        mid = (good + bad) // 2
        if check(mid):
            good = mid
        else:
            bad = mid
    return good, probed


def choose_micro_batch(
    largest: int, global_batch_size: int, world_size: int, margin: float
) -> tuple[int, str]:
    """Apply the safety margin, then keep global_batch_size: micro x accum x world must equal it."""
    if largest < 1:
        raise UserError(
            "not even micro_batch_size=1 fits in memory with the worst-case sequence lengths; "
            "lower data.max_source_length/max_target_length, enable model.gradient_checkpointing, "
            "or use a higher ZeRO stage or offload (see recipes/plan.py)."
        )
    limit = margin_applied(largest, margin)
    per_rank = global_batch_size // world_size
    divisors = [
        m for m in range(1, min(limit, per_rank) + 1) if global_batch_size % (m * world_size) == 0
    ]
    chosen = divisors[-1]
    note = ""
    if chosen < min(limit, per_rank):
        note = (
            f"{min(limit, per_rank)} would fit but does not divide global_batch_size={global_batch_size} / "
            f"world_size={world_size}; using {chosen}"
        )
    return chosen, note


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def device_description() -> dict[str, Any]:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"device": props.name, "memory_bytes": props.total_memory}
    return {
        "device": "cpu",
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def read_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, json.JSONDecodeError):
        return None


def write_cache(path: Path, key: str, value: dict[str, Any]) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    data[key] = value
    write_json_atomic(path, data)


def _injected_oom(rank: int, micro_batch_size: int) -> None:
    """Test-only: behave as if allocating this micro-batch ran out of memory on this rank."""
    spec = os.environ.get(OOM_TEST_ENV)
    if not spec:
        return
    thresholds = [int(x) for x in spec.split(",")]
    if micro_batch_size > thresholds[min(rank, len(thresholds) - 1)]:
        raise torch.OutOfMemoryError(
            f"injected: micro_batch_size {micro_batch_size} > {thresholds} on rank {rank}"
        )


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Prober:
    """Runs one probe per candidate micro-batch size, on every rank in lock step.

    `build(m)` returns the ProbeSteps (step on a batch, optimizer step, cleanup) for a freshly
    built model/optimizer/engine configured for micro-batch m.
    """

    def __init__(
        self,
        build: Callable[[int], ProbeSteps],
        make_batch: Callable[[int], dict[str, torch.Tensor]],
        rank: int,
        agree: Callable[[bool], bool],
        step_name: str = "forward/backward",
    ) -> None:
        self.build, self.make_batch, self.rank, self.agree = build, make_batch, rank, agree
        self.step_name = step_name  # what the trace says failed: "forward/backward" or "generate"
        self.trace: list[dict[str, Any]] = []

    def _phase(self, action: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, action()
        except torch.OutOfMemoryError:
            _free()
            return False, None

    def fits(self, micro_batch_size: int) -> bool:
        start = time.perf_counter()
        record: dict[str, Any] = {"micro_batch_size": micro_batch_size}
        state: dict[str, Any] = {}

        def admit() -> None:
            _injected_oom(self.rank, micro_batch_size)
            state["batch"] = self.make_batch(micro_batch_size)

        ok = self.agree(self._phase(admit)[0])
        if "batch" in state:  # the shapes actually probed, for the trace
            record["input_shape"] = list(state["batch"]["input_ids"].shape)
            if "labels" in state["batch"]:
                record["labels_shape"] = list(state["batch"]["labels"].shape)
        if ok:
            ok = self.agree(
                self._phase(lambda: state.update(engine=self.build(micro_batch_size)))[0]
            )
        failed_at = "allocate batch" if not ok else ""
        if ok:
            forward_backward, optimizer_step, cleanup = state["engine"]
            fitted, output = self._phase(lambda: forward_backward(state["batch"]))
            ok = self.agree(fitted)
            if isinstance(output, torch.Tensor):  # generation: the sequences it produced
                record["output_shape"] = list(output.shape)
            del output
            failed_at = self.step_name if not ok else ""
            if ok:
                ok = self.agree(self._phase(optimizer_step)[0])
                failed_at = "optimizer step" if not ok else ""
            cleanup()
        state.clear()
        _free()
        record.update(fits=ok, seconds=round(time.perf_counter() - start, 3))
        if torch.cuda.is_available():
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if failed_at:
            record["failed_at"] = failed_at
        self.trace.append(record)
        return ok


def cached_search(
    prober: Prober,
    limit: int,
    cache_file: Path,
    key: str,
    is_main: bool,
    *,
    choose: Callable[[int], Choice],
    worst_case_shape: dict[str, int],
) -> SearchResult:
    """The largest fitting size from cache_file[key] when every rank has it (a restarted or
    requeued job), else searched with `prober` up to `limit` and cached; then `choose`
    turns it into the size to use (margin, global batch), or raises when nothing fits."""
    cached = read_cache(cache_file, key)
    if prober.agree(cached is not None):
        largest, probes, seconds, was_cached = (
            cached["largest_fitting"],
            cached["probes"],
            cached["seconds"],
            True,
        )
    else:
        start = time.perf_counter()
        largest, _ = search_largest(prober.fits, limit)
        probes, seconds, was_cached = prober.trace, round(time.perf_counter() - start, 3), False
        if is_main:
            write_cache(
                cache_file, key, {"largest_fitting": largest, "probes": probes, "seconds": seconds}
            )
    chosen, grad_accum_steps, note = choose(largest)
    return SearchResult(
        largest_fitting=largest,
        chosen=chosen,
        grad_accum_steps=grad_accum_steps,
        probes=probes,
        worst_case_shape=worst_case_shape,
        seconds=seconds,
        cached=was_cached,
        note=note,
    )


def margin_applied(largest: int, margin: float) -> int:
    """(1 - margin) x largest, never below 1: e.g. largest 10, margin 0.1 -> 9."""
    return max(1, int(largest * (1.0 - margin)))
