"""`python -m clustertune.smoke [--cache-dir DIR]`: build the smoke assets, print key=path lines."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from clustertune.smoke.assets import ensure_smoke_assets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clustertune.smoke",
        description="Build the offline smoke assets if missing and print them as key=path lines.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to build them (default: $CLUSTERTUNE_CACHE or ~/.cache/clustertune)",
    )
    args = parser.parse_args(argv)
    import clustertune.quiet  # noqa: F401  (building imports DeepSpeed: no "accelerator CPU" note)

    # stdout carries only the key=path lines a Makefile reads; libraries imported while
    # building (DeepSpeed's accelerator probe) print there, so send them to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        paths = ensure_smoke_assets(args.cache_dir)
    for key, path in paths.items():
        print(f"{key}={path}")
