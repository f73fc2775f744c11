"""ROUGE of a base model, a full fine-tune or a LoRA adapter: generation on 1 to N GPUs.

    clustertune-launch --config_file launch/ddp.yaml --num_processes 8 recipes/evaluate.py \
        --config recipes/configs/flan_t5_base/evaluate.yaml --run_dir=outputs/flan_t5_base_lora
    python recipes/evaluate.py --config recipes/configs/smoke/evaluate.yaml   # one process

Side by side (no model needed): a table, comparison.md and comparison.png:
    python recipes/evaluate.py --compare outputs/eval_base outputs/eval_lora \
        --labels base,lora --out outputs/compare

Exit codes: 0 done, 2 bad config or input (one line on stderr says which and how to fix it).
"""

import argparse
import sys

from clustertune.errors import exit_on_user_error
from clustertune.evaluation import EvaluateConfig, Evaluator, compare_runs


def compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate.py --compare", description="Compare evaluation outputs."
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        required=True,
        metavar="EVAL_DIR",
        help="evaluation output_dirs (rouge.json)",
    )
    parser.add_argument(
        "--labels", help="comma-separated names, one per folder (default: folder names)"
    )
    parser.add_argument(
        "--out", default="outputs/compare", help="folder for comparison.md and comparison.png"
    )
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    print(compare_runs(args.compare, labels, args.out), flush=True)
    print(f"wrote {args.out}/comparison.md and {args.out}/comparison.png", flush=True)
    return 0


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:
        return compare(argv)
    from clustertune.config import parse_config

    evaluator = Evaluator(parse_config(EvaluateConfig, argv))
    evaluator.setup()
    evaluator.generate()
    evaluator.save()
    evaluator.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
