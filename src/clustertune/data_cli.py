"""`clustertune-data`: the training data of a fine-tuning config, without a model or compute.

    clustertune-data prepare --config CFG [--section.key=value ...] [--num_proc N] [--shard I/N]
    clustertune-data inspect --config CFG [--section.key=value ...] [--rows N] [--json]

`prepare` renders, tokenises, masks and measures the train and eval splits of every source
once, into the prepared data of the config's fingerprint (data.prepared_dir, default a cache
folder keyed by it: clustertune.prepare). Training reads it memory-mapped and never tokenises
again; what is missing it prepares itself. `--num_proc N` tokenises on N processes;
`--shard I/N` prepares the I-th of N disjoint parts of every split into the same folder (N
SLURM array tasks or nodes share the work; the set is complete once every part is there; the
examples are the same, in the same order, whatever N). A finished shard is kept; a killed one
is made again on the next run.

`inspect` renders the first N rows of the training data (of a mixture: its first source)
exactly as the training run would
(the same config parsing, template resolution, tokenisation and masks: training_data.py) and
shows what the loss is taken on: in a terminal, the text with the trained spans highlighted;
with --json, one line per row, `{"row": i, "input_ids": [...], "labels": [...]}` (`i` the
row's position in the data, labels -100 where no loss is taken), or `{"row": i, "skipped":
"<reason>"}` for a row that data.skip_invalid_rows skips. A config or data the run would
refuse is refused the same way: one line, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from clustertune.chat.encode import IGNORE_INDEX
from clustertune.errors import UserError, exit_on_user_error

HIGHLIGHT, RESET = "\033[1;32m", "\033[0m"  # trained text in bold green
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"  # trained text when the output is not a terminal


def inspect_rows(argv: list[str], num_rows: int) -> tuple[list[dict[str, Any]], Any]:
    """The first `num_rows` training rows of the config `argv` names, as training encodes
    them (the records `--json` prints), and the tokenizer."""
    from clustertune import data as data_lib
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.modeling import load_model_config, load_tokenizer, model_kind
    from clustertune.training_data import (
        check_data_for_model,
        load_rows,
        tokenize_rows,
        tokenize_spec,
    )

    cfg = parse_config(FinetuneConfig, argv)
    if not (cfg.data.train_file or cfg.data.dataset or cfg.data.mixture):
        raise UserError("no training data: set data.train_file, data.dataset or data.mixture.")
    name, _, data_cfg = cfg.data.source_configs()[0]  # a mixture: its first source
    if cfg.data.mixture:
        print(f"inspect: the first rows of mixture source '{name}'", file=sys.stderr)
    kind = model_kind(load_model_config(cfg.model.name_or_path))
    check_data_for_model(data_cfg, kind)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    spec = tokenize_spec(
        data_cfg, kind, tokenizer, cfg.model.name_or_path, cfg.peft.method == "none"
    )
    if spec.template is not None:
        print(spec.template.describe(), file=sys.stderr)
    source = data_cfg.train_file or data_cfg.dataset
    what = "data.train_file" if data_cfg.train_file else "data.dataset"
    rows = load_rows(data_cfg, source, data_cfg.train_split, what)
    first = rows.select(range(min(num_rows, len(rows))))
    tokenized = data_lib.tokenize_dataset(first, tokenizer, spec)
    if not data_cfg.skip_invalid_rows:  # refused as training refuses; skipped rows are shown
        tokenize_rows(first, tokenizer, spec, data_cfg, source, what)
    records: list[dict[str, Any]] = []
    for example in tokenized:
        if example["problem"]:
            skipped = example["problem"]
            if spec.format != "chat":  # a text column's value: name the column
                skipped = f"'{example['problem_field']}' {skipped}"
            records.append({"row": example["row"], "skipped": skipped})
        else:
            records.append(
                {
                    "row": example["row"],
                    "input_ids": example["input_ids"],
                    "labels": example["labels"],
                }
            )
    return records, tokenizer


def highlighted(tokenizer: Any, input_ids: list[int], labels: list[int], colour: bool) -> str:
    """The example's text with its trained tokens marked. Each run of trained or untrained
    tokens is the difference of two decoded prefixes, so spaces at run boundaries survive."""
    opening, closing = (HIGHLIGHT, RESET) if colour else (PLAIN_OPEN, PLAIN_CLOSE)
    boundaries = [0]
    for position in range(1, len(input_ids)):
        if (labels[position] != IGNORE_INDEX) != (labels[position - 1] != IGNORE_INDEX):
            boundaries.append(position)
    boundaries.append(len(input_ids))
    decoded = [tokenizer.decode(input_ids[:end]) for end in boundaries]
    parts = []
    for index in range(len(boundaries) - 1):
        text = decoded[index + 1][len(decoded[index]) :]
        trained = labels[boundaries[index]] != IGNORE_INDEX
        parts.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(parts)


def _prepare(args: argparse.Namespace, config_argv: list[str]) -> int:
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.prepare import open_prepared, parse_shard, plan_preparation, prepare_shard

    shard = parse_shard(args.shard) if args.shard else None
    if args.num_proc is not None and args.num_proc < 1:
        raise UserError(f"--num_proc={args.num_proc}: give at least 1 process.")
    plan = plan_preparation(parse_config(FinetuneConfig, config_argv))
    prepared = open_prepared(
        plan.cfg, plan.tokenizer, plan.kind, plan.sources, count=shard[1] if shard else None
    )
    by_name = {source.name: source for source in plan.sources}
    num_proc = args.num_proc or plan.cfg.data.num_proc
    started, rows = time.perf_counter(), 0
    for part in prepared.shards():
        if shard is None or part.index == shard[0]:
            record = prepare_shard(
                prepared, part, by_name[part.source], plan.tokenizer, num_proc=num_proc, log=_say
            )
            rows += record["rows"]
    seconds = time.perf_counter() - started
    total, missing = len(prepared.shards()), len(prepared.missing())
    state = "complete" if not missing else f"{total - missing} of {total} shards present"
    _say(
        f"prepared data in {prepared.root} ({state}; id {prepared.id}): {rows:,} rows here in "
        f"{seconds:.1f} s, {rows / max(seconds, 1e-9):,.0f} rows/s on {num_proc} process(es)"
    )
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


def _inspect(args: argparse.Namespace, config_argv: list[str]) -> int:
    # stdout carries the rows only; what loading says (rows skipped, ...) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        records, tokenizer = inspect_rows(config_argv, args.rows)
    colour = sys.stdout.isatty()
    for record in records:
        if args.json:
            print(json.dumps(record))
            continue
        if "skipped" in record:
            print(f"--- row {record['row']}: skipped: {record['skipped']}")
            continue
        ids, labels = record["input_ids"], record["labels"]
        trained = sum(label != IGNORE_INDEX for label in labels[1:])
        print(f"--- row {record['row']}: {len(ids)} tokens, {trained} trained")
        print(highlighted(tokenizer, ids, labels, colour))
    if not args.json:
        legend = f"{HIGHLIGHT}trained{RESET}" if colour else f"{PLAIN_OPEN}trained{PLAIN_CLOSE}"
        print(f"--- {legend} text is what the loss is taken on", file=sys.stderr)
    return 0


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clustertune-data",
        description="The training data of a fine-tuning config, without a model or compute.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="render the first training rows as training would, trained spans highlighted",
        description="Render the first N training rows exactly as the training run would. "
        "Takes the recipe's --config and --section.key=value overrides.",
    )
    inspect.add_argument("--rows", type=int, default=3, help="rows to show (default 3)")
    inspect.add_argument("--json", action="store_true", help="one JSON line per row")
    prepare = commands.add_parser(
        "prepare",
        help="tokenise the training data once, into the prepared data training reads",
        description="Render, tokenise, mask and measure the train and eval splits once. "
        "Takes the recipe's --config and --section.key=value overrides.",
    )
    prepare.add_argument("--num_proc", type=int, default=None, help="tokenising processes")
    prepare.add_argument("--shard", default=None, help="I/N: prepare the I-th of N parts")
    args, config_argv = parser.parse_known_args(argv)
    if args.command == "inspect" and args.rows < 1:
        raise UserError(f"--rows={args.rows}: give a positive number of rows.")
    import datasets

    import clustertune.quiet  # noqa: F401  (library warnings a user cannot act on)

    if args.command == "prepare":
        return _prepare(args, config_argv)
    datasets.disable_progress_bars()  # the rows are the output
    return _inspect(args, config_argv)


if __name__ == "__main__":
    sys.exit(main())
