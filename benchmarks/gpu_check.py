#!/usr/bin/env python
"""One prepared check for a GPU machine: what clustertune does on one H100/H200-class card.

    bash benchmarks/gpu_check.sh                  # or: make gpu-check; < 8 min on one H100/H200
    bash benchmarks/gpu_check.sh --cpu-dry        # the same steps on CPU with tiny shapes

Writes one JSON and one markdown table (default benchmarks/gpu_check.{json,md} on a GPU,
outputs/gpu_check_cpu_dry/ with --cpu-dry). Each step is a separate process with its own
time limit; a step that fails, times out or cannot run here is recorded and the next one
runs. Steps, most important first (a global deadline skips what is left):
  t5_{full,lora}_{single,zero2}, t5_full_fsdp2  flan-t5-base's shape (248 M parameters,
        random weights, no download), bf16, train.micro_batch_size=auto, global batch 64, a
        whole number of epochs through recipes/finetune.py (one process; launch/single_gpu.yaml,
        launch/zero2.yaml or launch/fsdp2.yaml, the same settings under each): the chosen
        micro-batch, peak memory as a share of the card, every global batch of the data (the
        longest included) run without running out of memory, real tokens/s and MFU = model
        FLOPs (benchmarks/flops.py, the data's real lengths) / time / the card's dense bf16
        peak (flops.PEAK_BF16_TFLOPS, by device name). t5_full_fsdp2 runs right after
        t5_full_zero2: bf16 there is FSDP2's MixedPrecisionPolicy (fp32 shards, bf16 compute,
        fp32 gradient reduction) where ZeRO-2 keeps bf16 weights and fp32 masters;
  make_smoke      `make smoke` itself: on a machine with nvidia-smi it picks
                  launch/single_gpu.yaml, one process, bf16 (model.dtype auto);
  eval_generation benchmarks/eval_throughput.py: batched, length-sorted generation vs a
                  per-example loop;
  causal_*        tiny-Llama chat SFT packed vs padded, and a ~0.5 B Llama shape packed
                  (common.LLAMA_SHAPES["0.5b"], sdpa: the recipe has no attention setting);
                  skipped, with the command lines they run, while data.packing does not exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, load_tokenizer, quiet_libraries, save_llama_folder, save_t5_folder
from flops import lora_train_flops, peak_bf16_tflops, t5_train_flops

GPU_DEADLINE_S = 450  # 7.5 min of steps, so the whole command stays under 8
GLOBAL_BATCH = {"gpu": 64, "cpu": 8}  # flan_t5_base/full.yaml's 64; tiny for the dry run


@dataclasses.dataclass
class Check:
    args: argparse.Namespace
    work: Path
    on_gpu: bool
    started: float = dataclasses.field(default_factory=time.perf_counter)
    steps: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_output: str = ""  # stdout + stderr of the last step run

    @property
    def mode(self) -> str:
        return "gpu" if self.on_gpu else "cpu"

    def time_left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.started)

    def run(self, name: str, command: list[str], timeout: float, **env: str) -> dict[str, Any]:
        """Run one step's command; its record (status, seconds, output tail) is kept."""
        record: dict[str, Any] = {"command": " ".join(command)}
        self.steps[name] = record
        limit = min(timeout, self.time_left())
        if limit < 20:
            record["status"] = "skipped: out of time (the global deadline)"
            return record
        print(
            f"[{time.perf_counter() - self.started:5.0f} s] {name}: {record['command']}", flush=True
        )
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                capture_output=True,
                text=True,
                timeout=limit,
            )
            record["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            record["status"] = f"timed out after {limit:.0f} s"
            output = (expired.stdout or b"").decode() + (expired.stderr or b"").decode()
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.last_output = output
        if record["status"] != "ok":
            record["output_tail"] = output[-2500:]
            print(f"  {record['status']}:\n{output[-1500:]}", flush=True)
        return record

    def launch(self, launch: str, config_args: list[str]) -> list[str]:
        launcher = str(Path(sys.executable).parent / "clustertune-launch")
        return [launcher, "--config_file", f"launch/{launch}.yaml", "--num_processes", "1"] + [
            "recipes/finetune.py",
            *config_args,
        ]


# --------------------------------------------------------------------------- preparing
def prepare(check: Check) -> dict[str, Any]:
    """The data (a whole number of global batches), tokenizer and T5 folder; model FLOPs of
    one epoch from the data's real tokenised lengths."""
    import datasets
    import numpy as np
    from transformers import AutoConfig

    from clustertune import data as data_lib
    from clustertune.atomicio import read_jsonl, write_jsonl_atomic
    from clustertune.config import SEED_PROMPT
    from clustertune.smoke import ensure_smoke_assets

    assets = ensure_smoke_assets(Path(os.environ.get("CLUSTERTUNE_CACHE", REPO / ".cache")))
    rows = read_jsonl(assets["train"])  # DialogSum-like generated dialogues, offline
    batch = GLOBAL_BATCH[check.mode]
    count = (len(rows) // batch) * batch if check.on_gpu else 2 * batch
    write_jsonl_atomic(check.work / "train.jsonl", rows[:count])
    tokenizer, _ = load_tokenizer("smoke", [])
    shape = "flan-t5-base" if check.on_gpu else "tiny"
    model = save_t5_folder(shape, tokenizer, 0, check.work / "t5")
    spec = data_lib.TokenizeSpec("seq2seq", SEED_PROMPT, "summary", 512, 128)
    tokenized = data_lib.tokenize_dataset(datasets.Dataset.from_list(rows[:count]), tokenizer, spec)
    source = np.asarray(tokenized["num_source_tokens"])
    target = np.asarray(tokenized["num_target_tokens"])
    config = AutoConfig.from_pretrained(check.work / "t5")
    return {
        "shape": shape,
        "examples": count,
        "global_batch_size": batch,
        "real_tokens_per_epoch": int(source.sum() + target.sum()),
        "model_flops_per_epoch": t5_train_flops(config, source, target),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def device_facts(on_gpu: bool) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__}
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device_name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            peak_bf16_tflops=peak_bf16_tflops(props.name),
            cuda=torch.version.cuda,
        )
    else:
        facts.update(device_name=f"{os.cpu_count()} CPU cores", peak_bf16_tflops=None)
        facts["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    try:
        import flash_attn  # noqa: F401

        facts["flash_attention"] = True
    except ImportError:
        facts["flash_attention"] = False
    return facts


# --------------------------------------------------------------------------- steps
def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_figures(
    records: list[dict[str, Any]], global_batch: int, flops_per_epoch: float, facts: dict
) -> dict[str, Any]:
    """Throughput of the last epoch (every earlier one warms up), MFU, peak memory."""
    steps = [r for r in records if "loss" in r and "samples_per_second" in r]
    last = max(r["epoch"] for r in steps)
    timed = [r for r in steps if r["epoch"] == last]
    seconds = sum(global_batch / r["samples_per_second"] for r in timed)
    tokens = sum(r["tokens_per_second"] * global_batch / r["samples_per_second"] for r in timed)
    peak = max(r.get("peak_memory_gib", 0.0) for r in steps)
    out: dict[str, Any] = {
        "steps": len(steps),
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / len(timed),
        "padding_efficiency": float(sum(r["padding_efficiency"] for r in timed) / len(timed)),
        "peak_memory_gib": peak,
        "peak_memory_share": peak / facts["memory_gib"] if facts.get("memory_gib") else None,
        "model_tflops_per_second": flops_per_epoch / seconds / 1e12,
        "final_loss": steps[-1]["loss"],
        "every_batch_of_the_epoch_ran": True,  # the run finished all its steps
    }
    auto = [r for r in records if r.get("event") == "auto_batch"]
    if auto:
        probes = auto[0].get("probes", [])
        out["auto_batch"] = {
            "chosen": auto[0]["chosen"],
            "largest_fitting": auto[0]["largest_fitting"],
            "grad_accum_steps": auto[0]["grad_accum_steps"],
            "worst_case_shape": auto[0].get("worst_case_shape"),
            "search_seconds": auto[0].get("seconds"),
            "probed": [
                (p["micro_batch_size"], p["fits"], p.get("peak_memory_gib")) for p in probes
            ],
        }
    if facts.get("peak_bf16_tflops"):
        out["mfu"] = out["model_tflops_per_second"] / facts["peak_bf16_tflops"]
    return out


def t5_training(check: Check, data: dict, facts: dict, peft: str, launch: str) -> None:
    """One T5 step under launch/<launch>.yaml; only the launch file differs between them."""
    name = f"t5_{peft}_{'single' if launch == 'single_gpu' else launch}"
    output_dir = check.work / name
    epochs = check.args.epochs if check.on_gpu else 2
    config_args = [
        f"--output_dir={output_dir}",
        "--resume=never",
        f"--model.name_or_path={check.work / 't5'}",
        "--model.dtype=auto",  # bf16 on a GPU that has it, fp32 on CPU
        f"--data.train_file={check.work / 'train.jsonl'}",
        f"--train.num_epochs={epochs}",
        f"--train.global_batch_size={data['global_batch_size']}",
        "--train.micro_batch_size=auto",
        "--train.learning_rate=1e-4" if peft == "full" else "--train.learning_rate=1e-3",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
        f"--peft.method={'none' if peft == 'full' else 'lora'}",
    ]
    record = check.run(name, check.launch(launch, config_args), timeout=150)
    record.update(logged_setup(check.last_output))
    if record["status"] == "ok":
        flops = data["model_flops_per_epoch"]
        flops = flops if peft == "full" else lora_train_flops(flops)
        record.update(
            training_figures(
                read_metrics(output_dir / "metrics.jsonl"), data["global_batch_size"], flops, facts
            )
        )


def logged_setup(output: str) -> dict[str, str]:
    """The precision and engine a training run logged ("parameters: ..., dtype bf16, FSDP2"),
    so a launch file that ran as something else (a plain single process) shows in the table."""
    for line in output.splitlines():
        if "parameters:" in line and ", dtype " in line:
            dtype, engine = line.split(", dtype ", 1)[1].split(", ", 1)
            return {"dtype": dtype.strip(), "engine": engine.strip()}
    return {}


def eval_generation(check: Check) -> None:
    out = check.work / "eval_throughput.json"
    command = [sys.executable, "benchmarks/eval_throughput.py", "--json", str(out)]
    command += ["--shape", "flan-t5-base", "--examples", "96"] if check.on_gpu else ["--quick"]
    record = check.run("eval_generation", command, timeout=120)
    if record["status"] == "ok":
        results = json.loads(out.read_text())
        record["ratio_vs_loop"] = results["ratio_vs_loop"]
        record["examples_per_second"] = {
            k: v["examples_per_second"] for k, v in results["variants"].items()
        }


def make_smoke(check: Check) -> None:
    venv = Path(sys.executable).parent.parent
    make = ["make", "-o", f"{venv}/.installed", f"VENV={venv}", "smoke"]
    # On CPU `make smoke` is the 2-process ZeRO-2 run the multi-process tests cover; the dry
    # run prints what it would run (-n), which shows the launch file make chose.
    record = check.run("make_smoke", make if check.on_gpu else [*make[:1], "-n", *make[1:]], 200)
    launches = [line for line in check.last_output.splitlines() if "--config_file" in line]
    if launches:  # the launch file and process count make chose
        record["launch"] = launches[0].split("--config_file", 1)[1].split("recipes/")[0]
        record["launch"] = record["launch"].strip(" \\")


def flash_available(check: Any) -> bool:
    import importlib.util

    return check.on_gpu and importlib.util.find_spec("flash_attn") is not None


def causal_commands(check: Check) -> dict[str, list[str]]:
    """The causal steps' command lines: packed vs padded tiny-Llama chat SFT (full fine-tune)
    and the ~0.5 B Llama shape packed (LoRA off, bf16, micro-batch auto)."""
    cache = Path(os.environ.get("CLUSTERTUNE_CACHE", REPO / ".cache")) / "smoke"
    base = [
        "--config=recipes/configs/smoke/chat_lora.yaml",
        f"--data.train_file={cache / 'data' / 'chat_train.jsonl'}",
        f"--data.eval_file={cache / 'data' / 'chat_validation.jsonl'}",
        "--resume=never",
        "--peft.method=none",
        "--model.dtype=auto",
        "--train.learning_rate=1e-4",
        "--train.log_every_steps=1",
        "--train.eval_every_steps=0",
        "--checkpoint.every_steps=0",
        f"--train.max_steps={30 if check.on_gpu else 2}",
        f"--data.max_eval_examples={128 if check.on_gpu else 8}",
    ]
    commands = {}
    for packing in ("true", "false"):
        name = f"causal_tiny_{'packed' if packing == 'true' else 'padded'}"
        extra = [f"--output_dir={check.work / name}", f"--data.packing={packing}"]
        extra.append(f"--model.name_or_path={cache / 'tiny-causal'}")
        commands[name] = check.launch("single_gpu", [*base, *extra])
    big = check.work / "llama_05b"
    commands["causal_05b_packed"] = check.launch(
        "single_gpu",
        [
            *base,
            f"--output_dir={check.work / 'causal_05b_packed'}",
            f"--model.name_or_path={big}",
            "--data.packing=true",
            "--train.micro_batch_size=auto",
            f"--train.global_batch_size={64 if check.on_gpu else 8}",
            # varlen kernels where installed: packed attention costs sum(L^2), not (sum L)^2
            *(["--model.attn_implementation=flash_attention_2"] if flash_available(check) else []),
        ],
    )
    return commands


def causal_steps(check: Check) -> None:
    from clustertune.config import DataConfig

    commands = causal_commands(check)
    if "packing" not in {f.name for f in dataclasses.fields(DataConfig)}:
        for name, command in commands.items():
            check.steps[name] = {
                "status": "skipped: data.packing does not exist yet (decoder-only SFT issue)",
                "command": " ".join(command),
            }
        return
    tokenizer, _ = load_tokenizer("smoke", [])
    shape, device = ("0.5b", "cuda") if check.on_gpu else ("tiny", "cpu")
    save_llama_folder(shape, tokenizer, 0, check.work / "llama_05b", device)
    for name, command in commands.items():
        record = check.run(name, command, timeout=150 if "05b" in name else 90)
        metrics = check.work / name / "metrics.jsonl"
        if record["status"] == "ok" and metrics.is_file():
            steps = [r for r in read_metrics(metrics) if "tokens_per_second" in r]
            timed = steps[1:] or steps
            record["tokens_per_second"] = sum(r["tokens_per_second"] for r in timed) / len(timed)
            record["padding_efficiency"] = timed[-1]["padding_efficiency"]
            record["peak_memory_gib"] = max(r.get("peak_memory_gib", 0) for r in steps)
    packed, padded = (check.steps.get(f"causal_tiny_{k}", {}) for k in ("packed", "padded"))
    if "tokens_per_second" in packed and "tokens_per_second" in padded:
        packed["ratio_vs_padded"] = packed["tokens_per_second"] / padded["tokens_per_second"]


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    facts = results["device"]
    peak = facts["peak_bf16_tflops"]
    lines = [
        f"# gpu_check on {facts['device_name']} ({facts['memory_gib']} GiB"
        + (f", dense bf16 peak {peak} TFLOP/s)" if peak else ")"),
        "",
        f"{results['mode']}; {results['data']['examples']} examples, T5 '{results['data']['shape']}', "
        f"global batch {results['data']['global_batch_size']}; {results['seconds']:.0f} s in all.",
        "",
        "| step | status | micro-batch (auto) | peak memory | real tok/s | MFU | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["steps"].items():
        auto = r.get("auto_batch", {})
        micro = f"{auto['chosen']} (fits {auto['largest_fitting']})" if auto else ""
        share = r.get("peak_memory_share")
        memory = f"{r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
        memory += f" ({share:.0%})" if share else ""
        tps = f"{r['tokens_per_second']:,.0f}" if "tokens_per_second" in r else ""
        extra = ""
        if "ratio_vs_loop" in r:
            extra = f" ({r['ratio_vs_loop']:.1f}x the loop)"
        if "ratio_vs_padded" in r:
            extra = f" ({r['ratio_vs_padded']:.2f}x padded)"
        if "launch" in r:
            extra = f" ({r['launch']})"
        if "engine" in r:
            extra = f" ({r['engine']}, {r['dtype']})"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        lines.append(
            f"| {name} | {r['status'].split(':')[0]}{extra} | {micro} | {memory} | {tps} | {mfu} "
            f"| {r.get('seconds', '')} |"
        )
    lines += [
        "",
        "Target: MFU >= 40 % for t5_full_single (flan-t5-base shape, bf16, full fine-tune).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry", action="store_true", help="tiny shapes on CPU: it works?")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and .md")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (replaced)")
    parser.add_argument("--epochs", type=int, default=2, help="T5 epochs (the last is timed)")
    parser.add_argument("--deadline", type=float, default=GPU_DEADLINE_S, help="seconds of steps")
    args = parser.parse_args(argv)
    if args.cpu_dry and args.deadline == GPU_DEADLINE_S:
        args.deadline = 1800  # CPU steps are slower; the dry run is about running them all
    quiet_libraries()
    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu_dry
    if not on_gpu and not args.cpu_dry:
        sys.exit("gpu_check: no CUDA GPU here; run with --cpu-dry to check the steps on CPU.")
    out = args.out or (REPO / "benchmarks" if on_gpu else REPO / "outputs" / "gpu_check_cpu_dry")
    work = args.work or REPO / "outputs" / (
        "gpu_check_work" if on_gpu else "gpu_check_cpu_dry_work"
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check = Check(args, work, on_gpu)
    facts = device_facts(on_gpu)
    data = prepare(check)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t5_training(check, data, facts, "full", "single_gpu")
    make_smoke(check)
    t5_training(check, data, facts, "lora", "single_gpu")
    t5_training(check, data, facts, "full", "zero2")
    t5_training(check, data, facts, "full", "fsdp2")
    t5_training(check, data, facts, "lora", "zero2")
    eval_generation(check)
    causal_steps(check)
    results = {
        "mode": "GPU"
        if on_gpu
        else "CPU dry run (tiny shapes: checks the steps, measures nothing)",
        "device": facts,
        "data": data,
        "steps": check.steps,
        "seconds": time.perf_counter() - check.started,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    from clustertune.atomicio import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gpu_check.json", results)
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    failed = [n for n, r in check.steps.items() if not r["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
