"""Atomic file writes: a reader (or a resume after kill -9) sees the old file or the whole new one.

Every writer in clustertune goes through here: resolved configs, metrics, caches, checkpoint
markers, eval reports, generated smoke data. The recipe is the classic one:

    write <dir>/.<name>.<pid>.tmp  ->  flush + fsync  ->  os.replace onto <name>  ->  fsync <dir>

The temp name carries the pid so two processes writing the same file (two ranks, two jobs on
a shared cache) never write into each other's temp file; the last rename wins, whole. It is
not mkstemp: mkstemp's 0600 mode would keep a shared cache private to one user.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry is what a rename changes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp file next to `path` that `atomic_path` renames onto it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write `path` through (any writer: savefig, torch.save, ...);
    on success it is fsynced and renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    # savefig and friends pick the format from the suffix: keep it last
    tmp = tmp.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}") if path.suffix else tmp
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_with(path: str | os.PathLike, write: Callable[[IO[str]], None]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        write(handle)
        handle.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_with(path, lambda handle: handle.write(text))


def write_json_atomic(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> None:
    _write_with(
        path, lambda handle: handle.write(json.dumps(data, indent=indent, sort_keys=sort_keys))
    )


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, the whole file replaced at once."""

    def write(handle: IO[str]) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_with(path, write)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one write() of one line: a kill leaves whole lines plus at most
    one torn last line, which `read_jsonl` skips."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a kill mid-append) is skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
    return records


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (ranks, array tasks, parallel test workers) on one
    file system, held by the open file: a killed holder releases it. Waiting on it is not a
    collective, so no process-group timeout runs while a rank waits."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
