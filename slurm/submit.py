"""Submit a recipe to SLURM (submitit; one task per node, preemption-safe). Installed as `clustertune-submit`.

    python slurm/submit.py --config slurm/cluster.yaml --nodes 2 --launch launch/zero2.yaml \
        -- recipes/finetune.py --config recipes/configs/flan_t5_base/full.yaml
    python slurm/submit.py --config slurm/dev-cluster.yaml --wait \
        -- recipes/finetune.py --config recipes/configs/smoke/lora.yaml
    python slurm/submit.py --help

Everything lives in the clustertune.slurm package (its docstring maps the modules; clustertune.slurm.job's
docstring walks through the signal and requeue path).
"""

import sys

from clustertune.slurm.cli import main

if __name__ == "__main__":
    sys.exit(main())
