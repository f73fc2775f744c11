"""Data prepared once, outside or ahead of training: tokenised, masked and measured into
Arrow files keyed by a fingerprint of everything they depend on (fingerprint.py), written in
shards that can be made in parallel and resumed (store.py), mixed by weight (mixture.py);
run.py is what `clustertune-data prepare`, training and `inspect` call."""

from clustertune.prepare.mixture import SourceShare, draw_mixture
from clustertune.prepare.run import (
    LoadedData,
    Preparation,
    Source,
    ensure_prepared,
    find_prepared,
    load_prepared,
    open_prepared,
    plan_preparation,
    plan_sources,
    prepare_shard,
)
from clustertune.prepare.store import PreparedSet, Shard, parse_shard

__all__ = [
    "LoadedData",
    "Preparation",
    "PreparedSet",
    "Shard",
    "Source",
    "SourceShare",
    "draw_mixture",
    "ensure_prepared",
    "find_prepared",
    "load_prepared",
    "open_prepared",
    "parse_shard",
    "plan_preparation",
    "plan_sources",
    "prepare_shard",
]
