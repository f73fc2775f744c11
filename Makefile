# clustertune: `make smoke` and `make test` work on a fresh machine (they create .venv).
# torch is installed first and only if missing: TORCH=... picks the build. The default
# takes the CPU wheel cached on CPU-only CI machines; on a GPU machine, `make TORCH=torch`
# (or pre-install the CUDA build you want in .venv) — nothing else pins torch.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
NPROC ?= 2
CACHE ?= .cache
# make smoke: one process on launch/single_gpu.yaml (bf16 by model.dtype auto) where a GPU is,
# else the 2-process ZeRO-2 run on CPU.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
SMOKE_LAUNCH ?= $(if $(HAS_GPU),single_gpu,zero2)
SMOKE_NPROC ?= $(if $(HAS_GPU),1,$(NPROC))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export CLUSTERTUNE_CACHE := $(abspath $(CACHE))

.PHONY: install assets smoke gpu-check test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

assets: $(VENV)/.installed
	$(PY) -m clustertune.smoke --cache-dir $(CACHE)

# LoRA fine-tune of the tiny local T5 (2-process ZeRO-2 on CPU, 1 process on a GPU), eval loss before and after.
# Always a fresh run: outputs/smoke_lora is the smoke's own folder and is replaced.
smoke: $(VENV)/.installed
	$(PY) -m clustertune.smoke --cache-dir $(CACHE)
	rm -rf outputs/smoke_lora outputs/smoke_eval_base outputs/smoke_eval_lora outputs/smoke_compare
	$(BIN)/clustertune-launch --config_file launch/$(SMOKE_LAUNCH).yaml --num_processes $(SMOKE_NPROC) \
	    recipes/finetune.py --config recipes/configs/smoke/lora.yaml
	# ROUGE on held-out generated dialogues (3 references each), before and after fine-tuning
	$(PY) recipes/evaluate.py --config recipes/configs/smoke/evaluate.yaml --output_dir=outputs/smoke_eval_base
	$(PY) recipes/evaluate.py --config recipes/configs/smoke/evaluate.yaml --run_dir=outputs/smoke_lora \
	    --output_dir=outputs/smoke_eval_lora
	$(PY) recipes/evaluate.py --compare outputs/smoke_eval_base outputs/smoke_eval_lora --labels base,lora \
	    --out outputs/smoke_compare
	@echo "smoke: outputs/smoke_lora (metrics.jsonl, training_curves.png, final/), outputs/smoke_compare (comparison.md/png)"

# One prepared command for a GPU machine (< 8 min on one H100/H200): benchmarks/gpu_check.{json,md}.
# GPU_CHECK_ARGS=--cpu-dry runs the same steps on CPU with tiny shapes.
gpu-check: $(VENV)/.installed
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# The whole suite, slow tiers included (multi-process, DeepSpeed, SLURM).
test: $(VENV)/.installed
	$(PY) -m clustertune.smoke --cache-dir $(CACHE)
	$(PY) -m pytest --durations=15

# Unit tier only (seconds).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not multiproc and not slurm"

LINT_PATHS := src recipes tests slurm benchmarks

# Formatting is checked, not applied: run `$(BIN)/ruff format $(LINT_PATHS)` to fix it.
lint: $(VENV)/.installed
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)

clean:
	rm -rf outputs .pytest_cache
