"""SLURM support: run a recipe on N nodes, one task per node, each running clustertune-launch.

Where things live:
- settings.py   `SlurmSettings`, the keys of slurm/*.yaml: loading, overrides, value checks
                (SLURM's time formats, no control characters in what reaches the sbatch script).
- env.py        SLURM's variables -> this node's rank, node count and rendezvous address/port.
- node.py       the per-node command (`python -m clustertune.slurm.node`, also used by
                slurm/train.sbatch and slurm/evaluate.sbatch).
- job.py        the submitit job (`LaunchJob`), signal forwarding, and the requeue decision
                after a stop with a checkpoint (its docstring walks through the signal path).
- requeue.py    that decision for slurm/train.sbatch (`python -m clustertune.slurm.requeue`).
- prepare.py    the prepare array before the training (--prepare-shards): its task (`PrepareJob`,
                `clustertune-data prepare --shard i/N`), its checks, and what an interrupted
                task does.
- preflight.py  checks before submitting (-> a `SubmissionPlan`).
- submit.py     sbatch parameters, the submitit executor, submission, --wait, the --dry-run text.
- cli.py        `clustertune-submit` (argparse `main`; also `python slurm/submit.py`).
The stop/requeue protocol itself (signals, exit code 75) is clustertune.stop.
"""
