#!/usr/bin/env bash
# One prepared command for a GPU machine: clustertune on one H100/H200-class card in < 8 min.
#   bash benchmarks/gpu_check.sh              # writes benchmarks/gpu_check.json and .md
#   bash benchmarks/gpu_check.sh --cpu-dry    # the same steps on CPU, tiny shapes (tests run it)
# Needs the project installed (make install TORCH=torch, or your CUDA torch in .venv first);
# PYTHON=/path/to/python picks another environment. No download: every model is built with
# random weights, the data is generated (the smoke assets). What each step does:
# benchmarks/gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CLUSTERTUNE_CACHE=${CLUSTERTUNE_CACHE:-$PWD/.cache}
"$PYTHON" -m clustertune.smoke --cache-dir "$CLUSTERTUNE_CACHE" >/dev/null
exec "$PYTHON" benchmarks/gpu_check.py "$@"
