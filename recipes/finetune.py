"""Full or LoRA fine-tuning of a seq2seq or decoder-only LM, on 1 to N GPUs.

    accelerate launch --config_file launch/zero2.yaml recipes/finetune.py \
        --config recipes/configs/flan_t5_base/lora.yaml [--section.key=value ...]
    python recipes/finetune.py --config recipes/configs/smoke/lora.yaml   # one process

Exit codes: 0 done (or already finished), 2 bad config/input, 75 stopped by a signal after
saving a checkpoint (requeue and rerun the same command to continue).
"""

import sys

import clustertune.quiet  # noqa: F401  (first: silences known-harmless library warnings)
from clustertune.config import FinetuneConfig, parse_config
from clustertune.errors import exit_on_user_error
from clustertune.stop import StopForRequeue, exit_code_after_stop
from clustertune.train import Trainer


@exit_on_user_error
def main() -> int:
    cfg = parse_config(FinetuneConfig)
    trainer = Trainer(cfg)
    if not trainer.setup():
        trainer.runtime.shutdown()
        return 0  # already finished
    try:
        trainer.train()
    except StopForRequeue as stop:
        print(f"clustertune: {stop}", file=sys.stderr, flush=True)
        trainer.runtime.shutdown()  # every rank saved and agreed to stop
        return exit_code_after_stop()  # 75, or 0 + status file under clustertune-launch
    trainer.save_final()
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
