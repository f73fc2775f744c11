"""Room and permission to write a run's outputs, checked before compute; a write that fails
anyway becomes one line naming the path and the cause.

- `check_writable`: a probe file written and removed in a folder (removed whatever happens:
  a probe that failed half-way on a full disk is not left behind); `remove_stale_probes` clears
  those of processes that were killed mid-probe.
- `check_space`: the bytes a run will hold at its peak (plan_disk.output_sizes estimates them)
  against the free space of the filesystem under output_dir, as this process sees it (every
  rank checks its own node's view).
- `write_failure_cause`: why a write failed, when the reason is the disk or the permissions:
  the OSError's own errno, or, for writers that lose it (torch.save reports a full disk as
  "unexpected pos" or "basic_ios::clear"), a filesystem with no space left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clustertune.errors import UserError
from clustertune.run_folder import WRITE_PROBE_PREFIX

NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# Below this, a failed write on the filesystem is put down to the disk being full.
LOW_SPACE_BYTES = 1 << 20


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists (what a new folder would be made in)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes this user may still write on the filesystem holding `path`."""
    stats = os.statvfs(_existing(path))
    return stats.f_bavail * stats.f_frsize


def _probe_name() -> str:
    return f"{WRITE_PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}"


def check_writable(folder: Path, what: str, fix: str = "choose a folder you can write to") -> None:
    """Refuse a folder this process cannot write into (creating it if needed), in one line
    naming `what` (e.g. "output_dir 'runs/a'"), the cause and `fix`."""
    probe = Path(folder) / _probe_name()
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as error:
        raise UserError(
            f"{what} is not writable ({error.strerror}); {fix}"
            + (", or free space" if error.errno in NO_SPACE_ERRNOS else "")
            + "."
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def remove_stale_probes(folder: Path) -> None:
    """Probe files of processes of this host that no longer run (killed mid-probe)."""
    prefix = f"{WRITE_PROBE_PREFIX}{socket.gethostname()}-"
    if not Path(folder).is_dir():
        return
    for probe in Path(folder).glob(f"{prefix}*"):
        pid = probe.name[len(prefix) :]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                probe.unlink()


@dataclass(frozen=True)
class OutputSizes:
    """Estimated bytes of what a run writes (plan_disk.output_sizes)."""

    checkpoint: int  # one checkpoint, all ranks' files
    final: int  # final/ (the model or adapter, merged/ too, the tokenizer)
    conversion: int = 0  # the universal form this launch makes of its checkpoint (resharding)

    def peak(self, keep_last: int, existing_checkpoints: int) -> int:
        """Bytes still to be written at the run's fullest moment: keep_last checkpoints and
        the one being saved before the oldest is pruned, or keep_last and final/ (written
        beside the previous final/, which is removed after). Checkpoints already on disk
        count towards keep_last."""
        held = max((keep_last + 1) * self.checkpoint, keep_last * self.checkpoint + self.final)
        return max(0, held - min(existing_checkpoints, keep_last) * self.checkpoint) + (
            self.conversion
        )


def check_space(output_dir: Path, sizes: OutputSizes, *, keep_last: int, existing: int) -> None:
    """Refuse, before compute, a run whose outputs cannot fit the free space under output_dir."""
    need = sizes.peak(keep_last, existing)
    free = free_bytes(output_dir)
    if need <= free:
        return
    conversion = (
        f", and ~{human_bytes(sizes.conversion)} to convert the checkpoint for this world size"
        if sizes.conversion
        else ""
    )
    held = f"{existing} already there, " if existing else ""
    raise UserError(
        f"output_dir '{output_dir}' has {human_bytes(free)} free, but this run needs about "
        f"{human_bytes(need)} more: {keep_last + 1} checkpoints of ~{human_bytes(sizes.checkpoint)} "
        f"({held}checkpoint.keep_last={keep_last} plus the one being saved) or {keep_last} "
        f"and final/ of ~{human_bytes(sizes.final)}{conversion}; free space, lower "
        "checkpoint.keep_last, or choose an output_dir on a larger disk."
    )


# How writers that lose the OSError report a full disk: torch.save's C++ stream
# ("unexpected pos", "basic_ios::clear", "PytorchStreamWriter failed writing file").
_WRITER_FAILURES = ("unexpected pos", "basic_ios::clear", "failed writing file")


def write_failure_cause(error: BaseException, path: Path) -> str | None:
    """Why writing under `path` failed, when it is the disk or the permissions; None else."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS | DENIED_ERRNOS:
            return os.strerror(seen.errno)
        if "os error 28" in str(seen) or "No space left on device" in str(seen):
            return os.strerror(errno.ENOSPC)  # safetensors' (Rust) message for ENOSPC
        if any(text in str(seen) for text in _WRITER_FAILURES):
            try:
                free = free_bytes(path)
            except OSError:
                return None
            if free < LOW_SPACE_BYTES:
                return f"{os.strerror(errno.ENOSPC)} ({human_bytes(free)} free)"
        seen = seen.__cause__ or seen.__context__
    return None


class OutputWriteError(UserError):
    """Writing the run's outputs failed because of the disk or its permissions."""


@contextlib.contextmanager
def reported_write_failures(
    path: Path, consequence: str | Callable[[], str], cleanup: Path | None = None
) -> Iterator[None]:
    """Turn a failed write under `path` caused by the disk or the permissions into one line:
    the file, the cause and `consequence` (what is intact, how to continue). On any failure
    the folder `cleanup` (a temporary one being filled) is removed first."""
    try:
        yield
    except Exception as error:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if isinstance(error, UserError):
            raise
        cause = write_failure_cause(error, path)
        if cause is None:
            raise
        named = getattr(error, "filename", None) or path
        text = consequence() if callable(consequence) else consequence
        raise OutputWriteError(f"cannot write {named}: {cause}; {text}") from None


FILL_DISK_ENV = "CLUSTERTUNE_TEST_FILL_DISK"  # test-only: "MOMENT=FILE", MOMENT step_N or final


def fill_disk_for_test(moment: str) -> None:
    """Test-only fault injection: at `moment` (named by FILL_DISK_ENV), fill the filesystem
    holding FILE with it, so that the writes that follow meet a real full disk."""
    when, _, filler = os.environ.get(FILL_DISK_ENV, "").partition("=")
    if when != moment or not filler:
        return
    with open(filler, "ab", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
