"""Memory plan for a fine-tuning config on a cluster shape, and the command to launch it.

    python recipes/plan.py --config recipes/configs/flan_t5_base/full.yaml \
        --gpus-per-node 8 --nodes 1 --gpu-memory-gib 80 [--section.key=value ...] [--json plan.json]

Prints model-state memory per GPU (and CPU memory per node) under DDP, ZeRO-1/2/3, FSDP2 and
offload, recommends the fastest launch file whose states leave room for activations, and prints
the exact `clustertune-launch` command. No GPU and no download needed. Exit codes: 0, 2 bad input.
"""

import sys

from clustertune.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
