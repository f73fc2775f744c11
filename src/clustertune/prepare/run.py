"""Preparing a run's data once, and reading it back: what `clustertune-data prepare`, the
training run and `clustertune-data inspect` share.

- `plan_sources`: each training source (the data section, or each data.mixture entry) with
  its tokenize spec (the chat template resolved as training resolves it) and its splits;
- `plan_preparation`: what `clustertune-data prepare` checks before tokenising (the SLURM
  preflight of a prepare array runs it too);
- `open_prepared`: the prepared set for this config's fingerprint (store.PreparedSet);
  `find_prepared`: the same, read only;
- `prepare_shard`: one shard of one split of one source, tokenised and checked as training
  tokenises (training_data.tokenize_rows), written into the set;
- `ensure_prepared`: every shard present (a missing or damaged one prepared here);
- `load_prepared`: the memory-mapped splits, the mixture drawn from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clustertune.config import DataConfig, FinetuneConfig
from clustertune.data import column
from clustertune.errors import UserError
from clustertune.prepare.fingerprint import (
    data_identity,
    fingerprint,
    fingerprint_id,
    source_fingerprint,
)
from clustertune.prepare.mixture import SourceShare, draw_mixture
from clustertune.prepare.store import DamagedShard, PreparedSet, Shard, default_root, shard_rows


@dataclass(frozen=True)
class Split:
    data: str  # the file or hub id
    split: str  # the hub split (train_split / eval_split)
    what: str  # the config key that names it, for messages
    max_rows: int | None = None  # eval: data.max_eval_examples


@dataclass
class Source:
    name: str
    weight: float
    data_cfg: DataConfig
    spec: Any  # data.TokenizeSpec
    splits: dict[str, Split] = field(default_factory=dict)  # "train", and "eval" if any


def _splits(data_cfg: DataConfig, key: str) -> dict[str, Split]:
    splits = {}
    train = data_cfg.train_file or data_cfg.dataset
    if train:
        what = f"{key}.train_file" if data_cfg.train_file else f"{key}.dataset"
        splits["train"] = Split(train, data_cfg.train_split, what)
    evaluation = data_cfg.eval_file or (
        data_cfg.dataset if data_cfg.dataset and not data_cfg.train_file else None
    )
    if evaluation:
        what = f"{key}.eval_file" if data_cfg.eval_file else f"{key}.dataset"
        splits["eval"] = Split(evaluation, data_cfg.eval_split, what, data_cfg.max_eval_examples)
    return splits


def plan_sources(cfg: FinetuneConfig, tokenizer: Any, kind: str) -> list[Source]:
    from clustertune.training_data import tokenize_spec

    sources = []
    mixture = bool(cfg.data.mixture)
    for index, (name, weight, data_cfg) in enumerate(cfg.data.source_configs()):
        spec = tokenize_spec(
            data_cfg, kind, tokenizer, cfg.model.name_or_path, cfg.peft.method == "none"
        )
        key = f"data.mixture[{index}]" if mixture else "data"
        sources.append(Source(name, weight, data_cfg, spec, _splits(data_cfg, key)))
    return sources


def _identity(split: Split) -> dict[str, Any]:
    from clustertune.data_files import LOCAL_FORMATS, load_split

    path = Path(split.data).expanduser()
    loaded = None
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        if not path.is_file():  # load_split's one line (missing file, a folder, ...)
            load_split(split.data, split=split.split, required_columns=[], what=split.what)
    else:  # a hub id: its cached copy's fingerprint
        import datasets

        try:
            loaded = datasets.load_dataset(split.data, split=split.split)
        except Exception as error:  # datasets raises many types
            raise UserError(
                f"{split.what}: cannot load hub dataset '{split.data}' split '{split.split}' "
                f"({str(error).splitlines()[0]}); check the id and split, or that it is in "
                "the HF cache when offline."
            ) from None
    return {**data_identity(split.data, split.split, loaded), "max_rows": split.max_rows}


@dataclass
class Preparation:
    """A config's data as `clustertune-data prepare` checks it before tokenising anything."""

    cfg: FinetuneConfig
    tokenizer: Any
    kind: str  # modeling.model_kind: "seq2seq" | "causal"
    sources: list[Source]


def plan_preparation(cfg: FinetuneConfig) -> Preparation:
    """Training data named, the data settings the model can take, its tokenizer, every source
    with its template resolved (plan_sources): each mistake one UserError."""
    from clustertune.modeling import load_model_config, load_tokenizer, model_kind
    from clustertune.training_data import check_data_for_model

    if not (cfg.data.train_file or cfg.data.dataset or cfg.data.mixture):
        raise UserError("no training data: set data.train_file, data.dataset or data.mixture.")
    kind = model_kind(load_model_config(cfg.model.name_or_path))
    check_data_for_model(cfg.data, kind)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    return Preparation(cfg, tokenizer, kind, plan_sources(cfg, tokenizer, kind))


def _location(
    cfg: FinetuneConfig, tokenizer: Any, kind: str, sources: list[Source]
) -> tuple[Path, dict[str, Any], bool]:
    """(the folder, the fingerprint, whether the folder is the user's data.prepared_dir); the
    default folder is keyed by the fingerprint. Every split's data must exist (_identity)."""
    value = fingerprint(
        model=cfg.model.name_or_path,
        kind=kind,
        tokenizer=tokenizer,
        sources={
            source.name: source_fingerprint(
                source.data_cfg,
                source.spec,
                {name: _identity(split) for name, split in source.splits.items()},
            )
            for source in sources
        },
    )
    explicit = bool(cfg.data.prepared_dir)
    root = (
        Path(cfg.data.prepared_dir).expanduser()
        if explicit
        else default_root() / fingerprint_id(value)
    )
    return root, value, explicit


def open_prepared(
    cfg: FinetuneConfig,
    tokenizer: Any,
    kind: str,
    sources: list[Source],
    count: int | None = None,
) -> PreparedSet:
    root, value, explicit = _location(cfg, tokenizer, kind, sources)
    return PreparedSet.open(root, value, count, explicit=explicit)


def find_prepared(preparation: Preparation, count: int) -> tuple[PreparedSet, bool]:
    """The config's prepared set as it is now, nothing written: (the set, whether it exists).
    A new one is the layout `count` shards would have. A folder prepared otherwise is refused
    as open_prepared refuses it."""
    p = preparation
    root, value, explicit = _location(p.cfg, p.tokenizer, p.kind, p.sources)
    found = PreparedSet.existing(root, value, explicit=explicit)
    return (found, True) if found is not None else (PreparedSet(root, value, count), False)


def _load_split_rows(source: Source, split: Split) -> Any:
    from clustertune.training_data import load_rows

    rows = load_rows(source.data_cfg, split.data, split.split, split.what)
    if split.max_rows is not None:
        rows = rows.select(range(min(split.max_rows, len(rows))))
    return rows


def prepare_shard(
    prepared: PreparedSet,
    shard: Shard,
    source: Source,
    tokenizer: Any,
    *,
    num_proc: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenise one shard into the set, unless it is there and intact (checked under its
    lock, so concurrent writers of one shard make it once). A damaged one is made again."""
    from clustertune.training_data import tokenize_rows

    split = source.splits[shard.split]
    with prepared.lock(shard):
        try:
            record = prepared.record(shard)
        except DamagedShard as damaged:
            log(
                f"prepared data: {damaged.folder} is damaged ({damaged.problem}); preparing it again"
            )
            import shutil

            shutil.rmtree(damaged.folder)
            record = None
        if record is not None:
            return record
        prepared.remove_leftovers(shard)
        start = time.perf_counter()
        rows = _load_split_rows(source, split)
        part = shard_rows(shard.index, shard.count, len(rows))
        tmp = prepared.begin(shard)
        if not part:  # more shards than rows (a short eval split): a shard with no rows
            empty = {"rows": 0, "examples": 0, "tokens": 0, "trained_tokens": 0, "seconds": 0}
            log(
                f"prepared {source.name}/{shard.split} shard {shard.index + 1} of {shard.count}: "
                f"no rows (the split has {len(rows):,} rows for {shard.count} shards)"
            )
            return prepared.commit(shard, tmp, None, empty)
        tokenized = tokenize_rows(
            rows.select(part),
            tokenizer,
            source.spec,
            source.data_cfg,
            split.data,
            split.what,
            row_offset=part.start,
            num_proc=num_proc,
            cache_file_name=str(tmp / "rows.arrow"),
        )
        if tokenized._indices is not None:  # rows were skipped: keep only the others
            tokenized = tokenized.flatten_indices(cache_file_name=str(tmp / "kept.arrow"))
        lengths = _row_lengths(tokenized)
        stats = {
            "rows": len(part),
            "examples": len(tokenized),
            "tokens": int(lengths.sum()),
            "trained_tokens": int(column(tokenized, "num_target_tokens").sum()),
            "seconds": round(time.perf_counter() - start, 2),
        }
        record = prepared.commit(shard, tmp, tokenized, stats)
        log(
            f"prepared {source.name}/{shard.split} shard {shard.index + 1} of {shard.count}: "
            f"{stats['examples']:,} examples of {stats['rows']:,} rows, {stats['tokens']:,} "
            f"tokens in {stats['seconds']:.1f} s ({stats['rows'] / max(stats['seconds'], 1e-9):,.0f} rows/s)"
        )
        return record


def _row_lengths(dataset: Any) -> np.ndarray:
    return column(dataset, "num_source_tokens") + column(dataset, "num_target_tokens")


def ensure_prepared(
    prepared: PreparedSet,
    sources: list[Source],
    tokenizer: Any,
    *,
    num_proc: int = 1,
    log: Callable[[str], None] = print,
) -> None:
    """Every shard of the set present and intact; the missing ones prepared here."""
    by_name = {source.name: source for source in sources}
    for shard in prepared.missing():  # made once: each is checked again under its lock
        prepare_shard(prepared, shard, by_name[shard.source], tokenizer, num_proc=num_proc, log=log)


@dataclass
class LoadedData:
    train: Any  # the (mixed) training rows, memory-mapped
    eval: Any | None  # every source's eval rows together
    eval_parts: dict[str, Any]  # each source's eval rows (several sources)
    shares: list[SourceShare]  # what each source got (a mixture); empty for one source


def load_prepared(prepared: PreparedSet, sources: list[Source], cfg: FinetuneConfig) -> LoadedData:
    import datasets

    trains = [prepared.load(source.name, "train") for source in sources]
    evals = {
        source.name: prepared.load(source.name, "eval")
        for source in sources
        if "eval" in source.splits
    }
    evaluation = None
    if evals:
        parts = list(evals.values())
        evaluation = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(sources) == 1 and not cfg.data.mixture:
        return LoadedData(trains[0], evaluation, evals, [])
    drawn, shares = draw_mixture(
        [source.name for source in sources],
        [_row_lengths(train) for train in trains],
        [source.weight for source in sources],
        by=cfg.data.mixture_weights,
        total_examples=cfg.data.mixture_examples,
        seed=cfg.seed,
    )
    offsets = np.cumsum([0, *(len(train) for train in trains)])
    indices = np.concatenate([rows + offset for rows, offset in zip(drawn, offsets, strict=False)])
    mixed = datasets.concatenate_datasets(trains).select(indices)
    return LoadedData(mixed, evaluation, evals, shares)
