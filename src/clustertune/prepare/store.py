"""Prepared data on disk: a folder per fingerprint, written in shards that can be made in
parallel and are each complete or absent.

    <prepared_dir>/manifest.json                       fingerprint, shard count, sources
    <prepared_dir>/<source>/<split>/shard-00000-of-00002/  datasets' Arrow files + shard.json

A shard holds rows [i*R/N, (i+1)*R/N) of its split (R rows in the data), tokenised, with the
unusable ones refused or skipped, so the shards read in order are the same examples in the
same order whatever N. Each is written into a temporary folder and renamed into place with
its shard.json (rows, tokens, every file's size) inside: a shard folder is complete, and a
killed writer leaves only a temporary folder, which the next writer of that shard removes.
One file lock per shard (fcntl, on the shared file system) lets N SLURM array tasks write
their shards at once and lets every rank of a training job wait for a shard without a
collective: a rank that waits holds no process-group call, so no NCCL timeout can end it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.atomicio import file_lock, write_json_atomic
from clustertune.errors import UserError
from clustertune.prepare.fingerprint import differences, fingerprint_id
from clustertune.run_folder import evaluation_evidence, inside_run_part, training_run_evidence

MANIFEST = "manifest.json"
SHARD_RECORD = "shard.json"
TMP_PREFIX = ".tmp-"


def default_root() -> Path:
    from clustertune.smoke.assets import default_cache_dir

    return default_cache_dir() / "prepared"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def shard_rows(index: int, count: int, rows: int) -> range:
    """Rows [i*R/N, (i+1)*R/N): disjoint, covering, in order, for any N."""
    return range(index * rows // count, (index + 1) * rows // count)


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N), I from 0 to N-1."""
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--shard {text}: write it as I/N, e.g. --shard 0/4.") from None
    if not slash or n < 1 or not 0 <= i < n:
        raise UserError(
            f"--shard {text}: I must be from 0 to N-1 (here 0 to {max(n - 1, 0)}), N at least 1."
        )
    return i, n


@dataclass(frozen=True)
class Shard:
    source: str  # the source's name ("data" without a mixture)
    split: str  # "train" | "eval"
    index: int
    count: int


class PreparedSet:
    """One prepared dataset: its folder, fingerprint and shard count."""

    def __init__(self, root: Path, fingerprint: dict[str, Any], count: int) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.id = fingerprint_id(fingerprint)
        self.count = count

    # ------------------------------------------------------------ layout
    def folder(self, shard: Shard) -> Path:
        return self.root / shard.source / shard.split / shard_name(shard.index, shard.count)

    def shards(self) -> list[Shard]:
        return [
            Shard(source, split, index, self.count)
            for source, record in self.fingerprint["sources"].items()
            for split in record["splits"]
            for index in range(self.count)
        ]

    def lock(self, shard: Shard) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.folder(shard).parent / f".lock-{shard.index:05d}")

    # ------------------------------------------------------------ manifest
    @classmethod
    def existing(
        cls, root: Path, fingerprint: dict[str, Any], *, explicit: bool
    ) -> PreparedSet | None:
        """The prepared set in `root` (its manifest's shard count), None where there is none
        yet; nothing is written. A folder holding data prepared otherwise is refused with what
        differs (an explicit data.prepared_dir is the user's; the default one is keyed by the
        fingerprint). The manifest is written whole (atomically): no lock needed to read it."""
        manifest_path = Path(root) / MANIFEST
        if not manifest_path.is_file():
            if explicit:
                _refuse_a_run_folder(Path(root))
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise UserError(
                f"data.prepared_dir: {manifest_path} is not valid JSON; remove the folder "
                "to prepare the data again."
            ) from None
        changed = differences(manifest.get("fingerprint", {}), fingerprint)
        if changed:
            where = "data.prepared_dir" if explicit else "the prepared-data cache"
            raise UserError(
                f"{where} '{root}' holds data prepared with other settings "
                f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}); "
                "use another data.prepared_dir, or remove that folder to prepare it again."
            )
        return cls(root, fingerprint, manifest["shards"])

    @classmethod
    def open(
        cls, root: Path, fingerprint: dict[str, Any], count: int | None, *, explicit: bool
    ) -> PreparedSet:
        """The prepared set in `root` for this fingerprint (`existing`), its manifest written
        if new. `count`: the shards asked for (None: the manifest's, else 1)."""
        cls.existing(root, fingerprint, explicit=explicit)  # refusals before the lock file
        with file_lock(Path(root) / ".lock-manifest"):
            found = cls.existing(root, fingerprint, explicit=explicit)
            if found is not None:
                if count is not None and count != found.count:
                    raise UserError(
                        f"--shard I/{count}: '{root}' is prepared in {found.count} shards; "
                        f"use --shard I/{found.count}, or another data.prepared_dir."
                    )
                return found
            count = count or 1
            write_json_atomic(
                Path(root) / MANIFEST,
                {"id": fingerprint_id(fingerprint), "shards": count, "fingerprint": fingerprint},
            )
            return cls(root, fingerprint, count)

    # ------------------------------------------------------------ shards
    def record(self, shard: Shard) -> dict[str, Any] | None:
        """The shard's record if it is complete and intact (every file its record lists, at
        its size, and made for this fingerprint); None when absent."""
        folder = self.folder(shard)
        record_path = folder / SHARD_RECORD
        if not folder.is_dir():
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        problem = None
        if record.get("id") != self.id:
            problem = "made for other settings" if record else "without its record"
        else:
            for name, size in record["files"].items():
                path = folder / name
                actual = path.stat().st_size if path.is_file() else None
                if actual != size:
                    problem = f"{name} is {actual} bytes, not {size}"
                    break
        if problem is not None:
            raise DamagedShard(folder, problem)
        return record

    def missing(self) -> list[Shard]:
        """The shards not present and intact (absent, being written, or damaged)."""
        absent = []
        for shard in self.shards():
            try:
                present = self.record(shard) is not None
            except DamagedShard:
                present = False
            if not present:
                absent.append(shard)
        return absent

    def begin(self, shard: Shard) -> Path:
        """A fresh temporary folder for this shard (call under its lock, leftovers removed)."""
        folder = self.folder(shard)
        tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, shard: Shard, tmp: Path, dataset: Any, stats: dict[str, Any]) -> dict:
        """Make `tmp` the shard: `dataset` must live in Arrow files inside it (written there
        by the tokenising map); its record goes in last, then the folder is renamed into
        place. Arrow files of `tmp` the dataset does not use (rows since skipped) go. A shard
        with no rows (dataset None) is a record without Arrow files."""
        arrow = [] if dataset is None else [Path(f["filename"]).name for f in dataset.cache_files]
        assert all((tmp / name).is_file() for name in arrow), "the shard's rows are not in tmp"
        for path in tmp.glob("*"):
            if path.name not in arrow:
                path.unlink() if path.is_file() else shutil.rmtree(path)
        files = {name: (tmp / name).stat().st_size for name in arrow}
        record = {"id": self.id, **stats, "arrow": arrow, "files": files}
        write_json_atomic(tmp / SHARD_RECORD, record)
        os.replace(tmp, self.folder(shard))
        return record

    def remove_leftovers(self, shard: Shard) -> None:
        """Temporary folders of this shard left by a killed writer (called under its lock)."""
        folder = self.folder(shard)
        if folder.parent.is_dir():
            for stale in folder.parent.glob(f"{TMP_PREFIX}{folder.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, source: str, split: str) -> Any:
        """The split's rows, all shards in order, memory-mapped (nothing read into memory)."""
        import datasets

        parts = []
        for index in range(self.count):
            shard = Shard(source, split, index, self.count)
            record = self.record(shard)
            if record is None:
                raise UserError(f"prepared data: {self.folder(shard)} is missing.")
            folder = self.folder(shard)
            parts += [datasets.Dataset.from_file(str(folder / name)) for name in record["arrow"]]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        unused = [c for c in ("problem", "problem_field") if c in dataset.column_names]
        return dataset.remove_columns(unused) if unused else dataset


class DamagedShard(Exception):
    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"{folder}: {problem}")
        self.folder, self.problem = folder, problem


def _refuse_a_run_folder(root: Path) -> None:
    """A data.prepared_dir that holds a training run or an evaluation, or lies in a run's
    checkpoints/ or final/ (which the run prunes or replaces), is refused: prepared data is
    written only into a folder of its own."""
    evidence = training_run_evidence(root) or evaluation_evidence(root)
    inside = inside_run_part(root)
    where = f"holds the files of a run ({', '.join(evidence)})" if evidence else f"is {inside}"
    if evidence or inside:
        raise UserError(
            f"data.prepared_dir '{root}' {where}, where prepared data must not be written; "
            "give it a folder of its own, e.g. beside the run folder."
        )
