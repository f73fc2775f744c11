"""The benchmark scripts keep working: each `--quick` mode runs as its own process and writes
the JSON the README's table is built from. No timing is asserted (machines differ, and these
tests share the cores with others); only that the keys exist and the numbers are sane."""

from __future__ import annotations

import importlib.util
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


def test_peers_quick(tmp_path, smoke_assets):
    """Seq2SeqTrainer and clustertune side by side on the same examples and initial weights."""
    out = tmp_path / "peers.json"
    command = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--data", "smoke"]
    result = run(
        [*command, "--json", str(out), "--work-dir", str(tmp_path)],
        env=recipe_env(CLUSTERTUNE_CACHE=str(smoke_assets["tiny_t5"].parents[1])),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    seq2seq = results["workloads"]["seq2seq"]
    systems = seq2seq["systems"]
    assert {"seq2seq_trainer", "clustertune"} <= set(systems), seq2seq.get("notes")
    assert positive(seq2seq["ratio_vs_seq2seq_trainer"])
    for name, system in systems.items():
        for key in ("tokens_per_second", "seconds_per_epoch", "peak_rss_gib"):
            assert positive(system[key]), (name, key)
        assert 0 < system["padding_efficiency"] <= 1, name
        assert system["same_real_tokens"], name  # one epoch over the same examples
        assert system["optimizer_steps"] == seq2seq["about"]["steps"], name
        assert math.isfinite(system["final_loss_fixed_examples"]), name
    # every system starts from the same saved weights
    initial = {round(s["initial_loss_fixed_examples"], 4) for s in systems.values()}
    assert len(initial) == 1, initial
    causal = results["workloads"]["causal"]
    if importlib.util.find_spec("trl") is None:  # the bench extra (make test installs it)
        assert "skipped" in causal
    else:
        assert {"trl_sft_trainer", "clustertune_packed", "clustertune_padded"} <= set(
            causal["systems"]
        ), causal.get("notes")
        assert positive(causal["ratio_vs_trl_sft_trainer"])
        assert causal["systems"]["clustertune_packed"]["padding_efficiency"] == 1.0
    assert len(results["run"]["load_before"]) == 3


def test_gpu_check_cpu_dry(tmp_path, smoke_assets):
    """The GPU check's steps end to end on CPU with tiny shapes, so the command is known to
    work before a GPU is lent."""
    result = run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry"]
        + ["--out", str(tmp_path), "--work", str(tmp_path / "work")],
        env=recipe_env(
            PYTHON=sys.executable, CLUSTERTUNE_CACHE=str(smoke_assets["tiny_t5"].parents[1])
        ),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = results["steps"]
    engines = {  # what each run logged it ran as: one process here, so no DDP
        "t5_full_single": "single process",
        "t5_lora_single": "single process",
        "t5_full_zero2": "ZeRO-2",
        "t5_full_fsdp2": "FSDP2",
        "t5_lora_zero2": "ZeRO-2",
    }
    for name, engine in engines.items():
        step = steps[name]
        assert step["status"] == "ok", (name, step)
        assert (step["engine"], step["dtype"]) == (engine, "fp32"), name  # bf16 on a GPU
        assert step["auto_batch"]["chosen"] >= 1 and positive(step["tokens_per_second"]), name
        assert positive(step["model_tflops_per_second"]) and "mfu" not in step  # no peak on CPU
        assert step["peak_memory_gib"] > 0, name
    # same tiny model, data and seed: FSDP2 and ZeRO-2 train the same steps (fp32 on CPU)
    assert steps["t5_full_fsdp2"]["steps"] == steps["t5_full_zero2"]["steps"]
    assert steps["t5_full_fsdp2"]["final_loss"] == pytest.approx(
        steps["t5_full_zero2"]["final_loss"], rel=1e-4
    )
    assert steps["eval_generation"]["status"] == "ok" and positive(
        steps["eval_generation"]["ratio_vs_loop"]
    )
    assert steps["make_smoke"]["status"] == "ok" and "zero2.yaml" in steps["make_smoke"]["launch"]
    for name in ("causal_tiny_packed", "causal_tiny_padded", "causal_05b_packed"):
        assert steps[name]["status"].startswith(("ok", "skipped")), (name, steps[name])
    assert "| step | status |" in (tmp_path / "gpu_check.md").read_text()


def test_checkpoint_checksum_quick(tmp_path, smoke_assets):
    results = run_quick("checkpoint_checksum.py", tmp_path, smoke_assets)
    assert results["size_gib"] == 64 / 1024
    for key in ("crc32_hot_s", "crc32_cold_s", "read_hot_s", "read_cold_s"):
        assert positive(results[key]) and positive(results["per_gib_s"][key]), key


def test_engines_quick(tmp_path, smoke_assets):
    results = run_quick("engines.py", tmp_path, smoke_assets)
    assert set(results["runs"]) == {"DDP full", "FSDP2 full", "DDP LoRA", "FSDP2 LoRA"}
    for name, run_ in results["runs"].items():
        assert "failed" not in run_, (name, run_.get("failed"))
        assert positive(run_["tokens_per_second"]) and positive(
            run_["command_to_first_step_seconds"]
        )
        assert len(run_["peak_rss_gib_per_rank"]) == 2
        assert all(positive(g) for g in run_["peak_rss_gib_per_rank"]), name
    for method in ("full", "LoRA"):  # the same examples and weights: the same training
        ddp, fsdp2 = (results["runs"][f"{e} {method}"]["final_loss"] for e in ("DDP", "FSDP2"))
        assert abs(ddp - fsdp2) <= 1e-5 * abs(ddp), (method, ddp, fsdp2)
