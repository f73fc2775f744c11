"""ROUGE of a base model, a full fine-tune or a LoRA adapter: generation on 1 to N GPUs.

    clustertune-launch --config_file launch/ddp.yaml --num_processes 8 recipes/evaluate.py \
        --config recipes/configs/flan_t5_base/evaluate.yaml --run_dir=outputs/flan_t5_base_lora
    python recipes/evaluate.py --config recipes/configs/smoke/evaluate.yaml   # one process

Side by side (no model needed): a table, comparison.md and comparison.png; the same as
recipes/compare.py, with the folders after --compare:
    python recipes/evaluate.py --compare outputs/eval_base outputs/eval_lora \
        --labels base,lora --out outputs/compare

Exit codes: 0 done, 2 bad config or input (one line on stderr says which and how to fix it).
"""

import sys

import clustertune.quiet  # noqa: F401  (first: silences known-harmless library warnings)
from clustertune.errors import exit_on_user_error
from clustertune.evaluation import EvaluateConfig, Evaluator, compare_main


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:  # the same as recipes/compare.py
        return compare_main(argv, prog="evaluate.py --compare", dirs_option="--compare")
    from clustertune.config import parse_config

    evaluator = Evaluator(parse_config(EvaluateConfig, argv))
    evaluator.setup()
    evaluator.generate()
    evaluator.save()
    evaluator.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
