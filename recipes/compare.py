"""ROUGE of several evaluations side by side, from their rouge.json (no model needed).

    python recipes/compare.py outputs/eval_base outputs/eval_lora --labels base,lora --out outputs/compare

Prints a Markdown table (best-reference ROUGE with 95% bootstrap intervals and the change
against the first folder, the other protocols, throughput) and writes comparison.md and
comparison.png to --out. `recipes/evaluate.py --compare DIR ...` is the same command.

Exit codes: 0 done, 2 bad input (one line on stderr says which and how to fix it).
"""

import sys

from clustertune.errors import exit_on_user_error
from clustertune.evaluation import compare_main


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    return compare_main(sys.argv[1:] if argv is None else argv, prog="compare.py")


if __name__ == "__main__":
    sys.exit(main())
