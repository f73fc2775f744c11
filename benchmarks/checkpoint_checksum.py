"""What verifying a checkpoint costs: the CRC-32 that COMPLETE.json records for every file
(clustertune.run_folder.crc32_of), read back from the page cache (just written: the save) and
from the disk (a resume after a restart), beside a plain read of the same bytes.

    python benchmarks/checkpoint_checksum.py --size-gib 1 --dir /path/on/the/checkpoint/disk
    python benchmarks/checkpoint_checksum.py --size-gib 20 --json checksum_20g.json

A cold read drops the file's pages first (posix_fadvise DONTNEED, no root needed), so it
measures the disk; what a cluster filesystem delivers is its own figure. The file is random
bytes, written in 8 MiB blocks, and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from clustertune.run_folder import CHUNK_BYTES, crc32_of

GIB = 2**30


def plain_read(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(CHUNK_BYTES):
            pass


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(action, path: Path, *, cold: bool) -> float:
    if cold:
        drop_cache(path)
    start = time.perf_counter()
    action(path)
    return time.perf_counter() - start


def measure(size_bytes: int, folder: Path) -> dict[str, float]:
    block = os.urandom(CHUNK_BYTES)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="checksum-bench-", delete=False) as f:
        path = Path(f.name)
    try:
        start = time.perf_counter()
        with open(path, "wb") as handle:
            for _ in range(size_bytes // CHUNK_BYTES):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        written = time.perf_counter() - start
        results = {"size_gib": size_bytes / GIB, "write_fsync_s": written}
        for name, action in (("read", plain_read), ("crc32", crc32_of)):
            results[f"{name}_cold_s"] = timed(action, path, cold=True)
            timed(action, path, cold=False)  # warm the cache (a file larger than RAM stays cold)
            results[f"{name}_hot_s"] = min(timed(action, path, cold=False) for _ in range(2))
        return results
    finally:
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the file checked")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--quick", action="store_true", help="64 MiB, for the test suite")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    size = 64 << 20 if args.quick else int(args.size_gib * GIB)
    size -= size % CHUNK_BYTES
    results = measure(size, args.dir)
    gib = results["size_gib"]
    per_gib = {key: value / gib for key, value in results.items() if key.endswith("_s")}
    results["per_gib_s"] = per_gib
    results["extrapolated_20_gib_s"] = {key: 20 * value for key, value in per_gib.items()}
    results["cpu_count"] = os.cpu_count()
    print(
        f"{gib:.2f} GiB: CRC-32 {results['crc32_hot_s']:.2f} s from the page cache "
        f"(plain read {results['read_hot_s']:.2f} s), {results['crc32_cold_s']:.2f} s from the "
        f"disk (plain read {results['read_cold_s']:.2f} s); per GiB: CRC-32 hot "
        f"{per_gib['crc32_hot_s']:.3f} s, cold {per_gib['crc32_cold_s']:.3f} s; 20 GiB at this "
        f"rate: hot {20 * per_gib['crc32_hot_s']:.1f} s, cold {20 * per_gib['crc32_cold_s']:.1f} s",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
