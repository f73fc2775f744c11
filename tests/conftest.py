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


@pytest.fixture
def no_slurm(monkeypatch):
    """A PATH without sinfo/srun/scontrol/sbatch: nothing can be submitted, and dry runs and
    preflight must work without a cluster (on a laptop)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path):
    """sinfo, scontrol and sbatch stand-ins: partitions debug (default) and gpu; scontrol logs its
    calls; sbatch fails, so a unit test can never submit to a real cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'debug*\\ngpu\\n'\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch must not run in unit tests' >&2\nexit 1\n"
    )
    calls = tmp_path / "scontrol.calls"
    state = tmp_path / "job_state"
    state.write_text("RUNNING")
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'case "$1" in show) echo "JobId=$4 JobState=$(cat {state}) Restarts=0";; esac\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    return {"calls": calls, "state": state}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
