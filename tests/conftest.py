from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import REPO  # noqa: E402
from slurm_cluster import *  # noqa: E402,F401,F403  (SLURM dev-cluster fixtures)


@pytest.fixture(scope="session")
def smoke_assets() -> dict[str, Path]:
    """Tiny T5 / causal LM, tokenizer and generated data, built by project code (no hub)."""
    from clustertune.smoke import ensure_smoke_assets

    cache = Path(os.environ.get("CLUSTERTUNE_CACHE", REPO / ".cache"))
    return ensure_smoke_assets(cache)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
