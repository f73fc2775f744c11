"""Evaluation: generation on every rank over stable example ids, exact ROUGE on the main process.

Lifecycle (like the Trainer): Evaluator(cfg).setup() -> generate() -> save() -> cleanup().
recipes/evaluate.py runs it; recipes/compare.py (or `evaluate.py --compare`) compares runs.

Where things live:
- config.py     `EvaluateConfig` and its sections, value checks, and resolution of unset
                keys from a training run_dir or an adapter (`resolve_config`);
- settings.py   its generation and rouge sections, and `generate_kwargs`;
- output_dir.py where an evaluation may write: not in a training run, not over results of
                other settings (unless overwrite=true);
- prompts.py    how a row becomes a prompt as training rendered it: raw text, text as the
                user turn of the chat template, or a conversation up to its last assistant
                turn; the tokens generation stops at (end-of-turn, EOS);
- evalset.py    the eval set (ids, references, tokenised prompts), batching, padding, and
                merging the predictions gathered from all ranks;
- evaluator.py  the `Evaluator` lifecycle: accelerator, model (LoRA merged), batch_size auto,
                distributed generate, save;
- adapter_keys.py  the keys that choose many adapters (model.adapter_paths), their folder names;
- adapters.py   many LoRA adapters of one base in one job (model.adapter_paths): loaded
                beside the base with peft's multi-adapter API, switched per system;
- report.py     per-example scores (predictions.jsonl) and the report (rouge.json);
- compare.py    side-by-side comparison of evaluations (comparison.md, comparison.png).

Why the result is the same for 1, 2 or N ranks:
- decoder-only prompts are left-padded (generation continues from the last position), and
  with the same batches the padding is the same on any world size;
- examples are sorted by prompt length (longest first, ties by position) and cut into
  batches of `batch_size` *before* anything depends on the world size, so every example is
  generated in the same batch, with the same padding, whatever the cluster shape;
- batch k goes to rank k % world_size; each prediction travels to the main process as a
  Python object (id, text) and is put back at its id's position, so an example can never
  count twice (the padding of a DistributedSampler's last shard, PITFALLS) or go missing;
- under ZeRO-3 every rank runs the same number of `generate` calls (a rank short of batches
  repeats the last one and drops its outputs) with `synced_gpus=True`, since each forward
  pass gathers parameters collectively: a rank that stopped early would hang the others.
"""

from clustertune.evaluation.adapter_keys import default_names
from clustertune.evaluation.adapters import System
from clustertune.evaluation.compare import (
    compare_main,
    compare_runs,
    comparison_table,
    load_report,
    plot_comparison,
)
from clustertune.evaluation.config import (
    EvalDataConfig,
    EvalModelConfig,
    EvaluateConfig,
    GenerationSettings,
    adapter_base,
    generate_kwargs,
    resolve_config,
)
from clustertune.evaluation.evalset import (
    ID_COLUMNS,
    EvalSet,
    assign_ids,
    count_generated,
    load_eval_set,
    make_batches,
    merge_predictions,
    pad_prompts,
    reference_lists,
    until_stop,
)
from clustertune.evaluation.evaluator import Evaluator
from clustertune.evaluation.prompts import PromptStyle, stop_token_ids
from clustertune.evaluation.report import example_scores

__all__ = [
    "ID_COLUMNS",
    "EvalDataConfig",
    "EvalModelConfig",
    "EvalSet",
    "EvaluateConfig",
    "Evaluator",
    "GenerationSettings",
    "PromptStyle",
    "System",
    "adapter_base",
    "assign_ids",
    "compare_main",
    "compare_runs",
    "comparison_table",
    "count_generated",
    "default_names",
    "example_scores",
    "generate_kwargs",
    "load_eval_set",
    "load_report",
    "make_batches",
    "merge_predictions",
    "pad_prompts",
    "plot_comparison",
    "reference_lists",
    "resolve_config",
    "stop_token_ids",
    "until_stop",
]
