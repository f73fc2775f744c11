"""On a CUDA GPU: the smoke LoRA recipe trains in bf16 through the single-GPU launch file.

Skipped without CUDA (tests/conftest.py skips every `gpu` test there); the CPU tiers cover
the same recipe in fp32. Here what only a GPU shows: bf16 is accepted (the recipe refuses it
without CUDA, exit 2), the memory logged is the CUDA allocator's peak, and the adapter it
writes loads back and runs on the GPU.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import describe, launch_command, run, train_losses

pytestmark = pytest.mark.gpu

MAX_STEPS = 30  # on 2 CPU cores in fp32 the loss goes ~7.6 -> ~4.9 over these steps


def test_smoke_lora_trains_in_bf16_on_gpu_and_adapter_loads(smoke_assets, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from clustertune.atomicio import read_jsonl

    out = tmp_path / "gpu_lora"
    args = [
        "--config",
        "recipes/configs/smoke/lora.yaml",
        f"--model.name_or_path={smoke_assets['tiny_t5']}",
        f"--data.train_file={smoke_assets['train']}",
        f"--data.eval_file={smoke_assets['validation']}",
        "--model.dtype=bf16",
        f"--output_dir={out}",
        f"--train.max_steps={MAX_STEPS}",
        "--train.log_every_steps=1",
        f"--checkpoint.every_steps={MAX_STEPS}",
    ]
    result = run(launch_command("recipes/finetune.py", args, launch="single_gpu", nproc=1))
    assert result.returncode == 0, describe(result)

    losses = train_losses(out)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)), losses
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert losses[MAX_STEPS] < losses[1], f"bf16 LoRA did not learn in {MAX_STEPS} steps: {losses}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # with CUDA present, peak_memory_gib is torch.cuda.max_memory_allocated: 0 if nothing
    # was allocated on the GPU (its CPU fallback, peak RSS, is used only without CUDA)
    peaks = [r["peak_memory_gib"] for r in records if "loss" in r]
    assert len(peaks) == MAX_STEPS and all(peak > 0 for peak in peaks), (
        f"peak_memory_gib {peaks}: nothing was allocated on the GPU"
    )

    final = out / "final"
    marker = json.loads((final / "clustertune_final.json").read_text())
    assert marker["step"] == MAX_STEPS and marker["peft_method"] == "lora", marker
    base = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
    model = PeftModel.from_pretrained(base, str(final)).to("cuda", torch.bfloat16).eval()
    assert any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = read_jsonl(smoke_assets["validation"])[:4]
    batch = tokenizer([r["dialogue"] for r in rows], padding=True, return_tensors="pt").to("cuda")
    labels = tokenizer([r["summary"] for r in rows], padding=True, return_tensors="pt")
    labels = labels.input_ids.masked_fill(labels.attention_mask == 0, -100).to("cuda")
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert loss.device.type == "cuda" and math.isfinite(loss.item()), loss
