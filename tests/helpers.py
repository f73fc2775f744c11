"""Shared helpers for the test tiers: running recipes for real and reading their outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def load_recipe(name: str):
    """recipes/<name>.py as a module named <name>_recipe: never put recipes/ on sys.path, where
    recipes/evaluate.py would shadow the `evaluate` library for the rest of the test session."""
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(
    script: str, args: list[str], *, launch: str | None = None, nproc: int = 1, wrapper: bool = True
) -> list[str]:
    """`python script` for one plain process, else (clustertune-)accelerate launch."""
    if launch is None:
        return [sys.executable, str(REPO / script), *args]
    launcher = (
        [str(VENV_BIN / "clustertune-launch")]
        if wrapper
        else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    # A free rendezvous port per launch: two launches on one machine (tests run side by side,
    # or beside a developer's run) would otherwise both take accelerate's default 29500.
    port = ["--main_process_port", str(free_port())] if nproc > 1 else []
    return [
        *launcher,
        "--config_file",
        str(REPO / "launch" / f"{launch}.yaml"),
        "--num_processes",
        str(nproc),
        *port,
        str(REPO / script),
        *args,
    ]


def run(
    command: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, env=env or recipe_env(), capture_output=True, text=True, timeout=timeout
    )
    return result


def train_losses(output_dir: Path) -> dict[int, float]:
    records = [
        json.loads(line)
        for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def descendants(pid: int) -> list[int]:
    from clustertune.launch import descendants as tree

    return tree(pid)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Kill a launcher and every process under it (torchrun workers live in new sessions)."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for_step(
    output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300
) -> int:
    """Poll metrics.jsonl until a train record with step >= `step` appears; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run exited with {process.returncode} before step {step}")
        losses = train_losses(output_dir) if (Path(output_dir) / "metrics.jsonl").exists() else {}
        if losses and max(losses) >= step:
            return max(losses)
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


# Conversations no recipe can use: (case, messages, what the error says). Training and
# evaluation refuse (or skip) each the same way.
BAD_CONVERSATIONS = [
    ("not a list", "hello", "is str, not a list"),
    ("no role", [{"content": "hi"}, {"role": "assistant", "content": "x"}], "has no 'role'"),
    ("no content", [{"role": "user"}, {"role": "assistant", "content": "x"}], "no text 'content'"),
    ("unknown role", [{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ("no assistant", [{"role": "user", "content": "hi"}], "no assistant turn"),
    (
        "empty reply",
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
        "empty assistant reply",
    ),
]
