"""What prepared data is a function of: its fingerprint.

Prepared rows depend on the data files (their identity: path, size, modification time; a hub
split: its datasets fingerprint), the tokenizer (its vocabulary, merges and special tokens),
the chat template and how its masks are found (chat.ChatTemplate.identity, which includes a
rendered date), every data setting that changes the tokens, and the code that tokenises
(data.TOKENIZE_VERSION, PREPARE_VERSION). Not in it: what training does with the rows (the
mixture weights, batch sizes, the seed), so those change without preparing again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from clustertune.config import DataConfig
from clustertune.config.finetune import TOKEN_SETTINGS

PREPARE_VERSION = 1


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def data_identity(source: str, split: str, loaded: Any = None) -> dict[str, Any]:
    """A local file by path, size and modification time (a changed file is new data); a hub
    split by the fingerprint datasets gave its cached copy (`loaded`)."""
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"dataset": source, "split": split, "fingerprint": getattr(loaded, "_fingerprint", None)}


def tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest(
        [vocabulary, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None)]
    )


def source_fingerprint(
    data_cfg: DataConfig, spec: Any, splits: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """One source's part: its token settings, its template, its splits' data identities
    (`splits`: {"train": data_identity, "eval": ... with max_eval_examples})."""
    return {
        **{f"data.{key}": getattr(data_cfg, key) for key in (*TOKEN_SETTINGS, "chat_template")},
        "template": spec.template.identity() if spec.template is not None else None,
        "splits": splits,
    }


def fingerprint(
    *, model: str, kind: str, tokenizer: Any, sources: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    from clustertune.data import TOKENIZE_VERSION

    return json.loads(
        json.dumps(
            {
                "prepare_version": PREPARE_VERSION,
                "tokenize_version": TOKENIZE_VERSION,
                "model": model,
                "kind": kind,
                "tokenizer": tokenizer_identity(tokenizer),
                "sources": sources,
            }
        )
    )


def fingerprint_id(value: dict[str, Any]) -> str:
    return _digest(value)


def differences(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two fingerprints; a source's
    keys read as the config's (data.max_length, or `... (mixture source b)`)."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{_readable(prefix + key)}: {old!r} -> {new!r}")
    return out


def _readable(key: str) -> str:
    if not key.startswith("sources."):
        return key
    _, source, rest = key.split(".", 2)
    return rest if source == "data" else f"{rest} (mixture source {source})"
