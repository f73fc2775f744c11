"""The prepare stage at scale: rows/s, launch -> first step on prepared data, peak memory,
and TRL's SFTTrainer preparing the same rows, in one run.

    python benchmarks/prepare.py [--sizes 10000 100000 1000000] [--kinds text chat]
                                 [--work DIR] [--json benchmarks/prepare.json] [--no-trl]

Data: `text` is DialogSum-shaped rows (the smoke dialogues and summaries, cycled with new ids)
for the tiny T5, the tutorial's model; `chat` is multi-turn conversations (the smoke chat
data, cycled) for the tiny Llama with the built-in ChatML template (generation markers: one
render a row) and packing. For each kind and size, each a separate process, timed as a whole (imports
included), peak RSS from /usr/bin/time:
- `clustertune-data prepare` on 1 process, on 2 (`--num_proc 2`), and as 2 shards run at once
  (`--shard 0/2`, `--shard 1/2`: two processes, as two array tasks would be);
- `recipes/finetune.py` (one process, one step, log every step) on the prepared set: seconds
  from launch to the first step's record in metrics.jsonl, and the run's peak RSS;
- TRL's SFTTrainer constructed on the same rows (chat: the conversations; text: prompt and
  completion), which tokenises them (`dataset_num_proc` 1), for comparison (chat only: TRL
  trains decoder-only models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
sys.path.insert(0, str(REPO / "src"))


def write_rows(kind: str, size: int, path: Path) -> Path:
    from clustertune.smoke import ensure_smoke_assets

    assets = ensure_smoke_assets()
    source = assets["train" if kind == "text" else "chat_train"]
    rows = [json.loads(line) for line in Path(source).read_text().splitlines()]
    with path.open("w") as handle:
        for index in range(size):
            row = dict(rows[index % len(rows)])
            row["id"] = f"{kind}_{index}"
            handle.write(json.dumps(row) + "\n")
    return path


def config_args(kind: str, train_file: Path, prepared: Path) -> list[str]:
    from clustertune.smoke import ensure_smoke_assets

    assets = ensure_smoke_assets()
    common = [f"--data.train_file={train_file}", f"--data.prepared_dir={prepared}"]
    if kind == "text":
        return [
            "--config",
            str(REPO / "recipes/configs/smoke/lora.yaml"),
            *common,
            "--data.eval_file=null",
        ]
    return [
        "--config",
        str(REPO / "recipes/configs/smoke/chat_lora.yaml"),
        *common,
        "--data.eval_file=null",
        f"--model.name_or_path={assets['tiny_causal']}",
        "--data.chat_template=chatml",  # the built-in, with generation markers: one render a row
    ]


def timed(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["/usr/bin/time", "-f", "peak_rss_kb=%M", *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[str, float]:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} failed:\n{out[-2000:]}\n{err[-3000:]}")
    peak = [line for line in err.splitlines() if line.startswith("peak_rss_kb=")][-1]
    return out, int(peak.split("=")[1]) / 2**20  # GiB


def run_prepare(kind: str, train_file: Path, work: Path, env: dict, how: str) -> dict:
    prepared = work / f"prepared-{how}"
    args = config_args(kind, train_file, prepared)
    base = [str(BIN / "clustertune-data"), "prepare", *args]
    start = time.perf_counter()
    if how == "2 shards":
        processes = [timed([*base, "--shard", f"{i}/2"], env) for i in range(2)]
        peaks = [finish(p)[1] for p in processes]
    else:
        extra = ["--num_proc", "2"] if how == "2 processes" else []
        peaks = [finish(timed([*base, *extra], env))[1]]
    seconds = time.perf_counter() - start
    return {
        "how": how,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(max(peaks), 2),
        "prepared": str(prepared),
    }


def first_step(kind: str, train_file: Path, prepared: Path, work: Path, env: dict) -> dict:
    output = work / f"run-{prepared.name}"
    args = [
        *config_args(kind, train_file, prepared),
        f"--output_dir={output}",
        "--train.max_steps=1",
        "--train.log_every_steps=1",
        "--checkpoint.every_steps=0",
        "--train.micro_batch_tokens=0",
        "--train.micro_batch_size=8",
        "--train.global_batch_size=16",
    ]
    start = time.perf_counter()
    process = timed([PYTHON, str(REPO / "recipes/finetune.py"), *args], env)
    metrics, seconds = output / "metrics.jsonl", None
    while process.poll() is None and seconds is None:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            seconds = time.perf_counter() - start
        time.sleep(0.05)
    _, peak = finish(process)
    if seconds is None:
        seconds = time.perf_counter() - start
    return {"launch_to_first_step_s": round(seconds, 1), "peak_rss_gib": round(peak, 2)}


TRL_SCRIPT = r"""
import json, sys, time
import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
model_dir, train_file, out = sys.argv[1:4]
start = time.perf_counter()
rows = datasets.load_dataset("json", data_files=train_file, split="train")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
args = SFTConfig(output_dir=out, max_length=1024, report_to="none", dataset_num_proc=1, bf16=False,
                 per_device_train_batch_size=8)
trainer = SFTTrainer(model=model, args=args, train_dataset=rows.select_columns(["messages"]),
                     processing_class=tokenizer)
print(json.dumps({"rows": len(trainer.train_dataset), "seconds": time.perf_counter() - start}))
"""


def run_trl(train_file: Path, work: Path, env: dict) -> dict:
    from clustertune.smoke import ensure_smoke_assets

    model = ensure_smoke_assets()["tiny_causal"]
    start = time.perf_counter()
    out, peak = finish(
        timed([PYTHON, "-c", TRL_SCRIPT, str(model), str(train_file), str(work / "trl")], env)
    )
    seconds = time.perf_counter() - start
    return {
        "how": "TRL SFTTrainer (1 process)",
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["text", "chat"])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    work_root = args.work or Path(tempfile.mkdtemp(prefix="clustertune-prepare-"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(work_root / "hf-cache"),
    }
    results = []
    print(f"{'kind':5s} {'rows':>9s} {'how':28s} {'s':>7s} {'rows/s':>8s} {'peak GiB':>8s}")
    for kind in args.kinds:
        for size in args.sizes:
            work = work_root / f"{kind}-{size}"
            work.mkdir(parents=True, exist_ok=True)
            train_file = write_rows(kind, size, work / "train.jsonl")
            ways = ["1 process", "2 processes", "2 shards"]
            records = [run_prepare(kind, train_file, work, env, how) for how in ways]
            if kind == "chat" and not args.no_trl:
                records.append(run_trl(train_file, work, env))
            for record in records:
                record.update(kind=kind, rows=size, rows_per_second=round(size / record["seconds"]))
                print(
                    f"{kind:5s} {size:9,d} {record['how']:28s} {record['seconds']:7.1f} "
                    f"{record['rows_per_second']:8,d} {record['peak_rss_gib']:8.2f}"
                )
            step = first_step(kind, train_file, Path(records[0]["prepared"]), work, env)
            step.update(kind=kind, rows=size, how="train on prepared")
            print(
                f"{kind:5s} {size:9,d} {'launch -> first step':28s} "
                f"{step['launch_to_first_step_s']:7.1f} {'':8s} {step['peak_rss_gib']:8.2f}"
            )
            results += [*records, step]
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
