"""The benchmark scripts keep working: each `--quick` mode runs as its own process and writes
the JSON the README's table is built from. No timing is asserted (machines differ, and these
tests share the cores with others); only that the keys exist and the numbers are sane."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import REPO, recipe_env, run

# Each quick run takes ~20 s alone on 2 cores, minutes on a loaded machine.
pytestmark = pytest.mark.multiproc


def run_quick(script: str, tmp_path: Path, smoke_assets: dict[str, Path]) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    result = run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--json", str(out)],
        env=recipe_env(CLUSTERTUNE_CACHE=str(smoke_assets["tiny_t5"].parents[1])),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_throughput_quick(tmp_path, smoke_assets):
    results = run_quick("train_throughput.py", tmp_path, smoke_assets)
    assert positive(results["ratio_vs_seed"]) and positive(results["ratio_vs_hf_example"])
    assert 0 < results["padding_efficiency"] <= 1
    assert set(results["variants"]) == {"seed", "hf_example", "clustertune"}
    for name, variant in results["variants"].items():
        for key in ("tokens_per_second", "seconds_per_epoch", "model_tflops_per_second"):
            assert positive(variant[key]), (name, key, variant[key])
        assert (
            0 < variant["padding_efficiency"] <= 1 and 0 < variant["padding_efficiency_epoch"] <= 1
        )
        assert math.isfinite(variant["mean_training_loss"]), name
        assert variant["peak_memory_gib"] >= 0
    variants = results["variants"]
    # Same examples in every variant, so the same real tokens; only padding differs.
    assert len({v["real_tokens"] for v in variants.values()}) == 1
    assert (
        variants["seed"]["padding_efficiency"]
        < variants["hf_example"]["padding_efficiency"]
        <= variants["clustertune"]["padding_efficiency"]
    )
    run_info = results["run"]
    assert run_info["quick"] and run_info["steps"] > 0 and run_info["batch_size"] > 0
    assert run_info["data_source"] and run_info["shape"] and run_info["device"] in ("cpu", "cuda")


def test_eval_throughput_quick(tmp_path, smoke_assets):
    results = run_quick("eval_throughput.py", tmp_path, smoke_assets)
    assert positive(results["ratio_vs_loop"]) and positive(results["ratio_vs_batched"])
    assert set(results["variants"]) == {"loop", "batched", "clustertune"}
    for name, variant in results["variants"].items():
        assert positive(variant["examples_per_second"]), name
        assert 0 < variant["prompt_padding_efficiency"] <= 1, name
    assert (
        results["variants"]["loop"]["prompt_padding_efficiency"] == 1.0
    )  # one prompt per call: no padding
    assert results["run"]["examples"] > 0 and results["run"]["data_source"]
