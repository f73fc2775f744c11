"""The prepare stage: `clustertune-data prepare` with 1 process, 2 processes and 2 shards gives
the same prepared data; a shard killed mid-write is made again; training reads prepared data
without tokenising (checked) and trains as it does on data it tokenised itself; weighted
mixtures draw their shares; the bad inputs, one line each (unit tier, and the commands as
subprocesses)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, VENV_BIN, recipe_env

from clustertune.errors import UserError
from clustertune.prepare import draw_mixture

AGENT_CONFIG = str(REPO / "recipes/configs/smoke/agent_lora.yaml")


def prepare(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "clustertune-data"), "prepare", "--config", AGENT_CONFIG, *args],
        cwd=REPO,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows_of(folder: Path) -> dict[str, list]:
    """Every split of a prepared set as plain lists (loaded the way training loads them)."""
    from clustertune.prepare.store import MANIFEST, PreparedSet

    manifest = json.loads((folder / MANIFEST).read_text())
    prepared = PreparedSet(folder, manifest["fingerprint"], manifest["shards"])
    out = {}
    for split in ("train", "eval"):
        data = prepared.load("data", split)
        out[split] = [data[column] for column in ("row", "input_ids", "labels")]
    return out


def test_one_process_two_processes_and_two_shards_prepare_the_same_rows(tmp_path):
    one, two, shards = tmp_path / "one", tmp_path / "two", tmp_path / "shards"
    assert prepare(f"--data.prepared_dir={one}").returncode == 0
    done = prepare(f"--data.prepared_dir={two}", "--num_proc", "2")
    assert done.returncode == 0, done.stderr
    assert "on 2 process(es)" in done.stdout and "(complete;" in done.stdout
    first = prepare(f"--data.prepared_dir={shards}", "--shard", "1/2")
    assert first.returncode == 0 and "(2 of 4 shards present;" in first.stdout
    assert prepare(f"--data.prepared_dir={shards}", "--shard", "0/2").returncode == 0
    reference = rows_of(one)
    assert len(reference["train"][0]) == 2000 and reference["train"][0] == list(range(2000))
    assert rows_of(two) == reference and rows_of(shards) == reference
    again = prepare(f"--data.prepared_dir={shards}", "--shard", "0/2")  # a finished shard is kept
    assert again.returncode == 0 and "shard 1 of 2" not in again.stdout


def test_a_shard_killed_mid_write_is_made_again(tmp_path):
    folder = tmp_path / "prepared"
    process = subprocess.Popen(
        [
            str(VENV_BIN / "clustertune-data"),
            "prepare",
            "--config",
            AGENT_CONFIG,
            f"--data.prepared_dir={folder}",
        ],
        cwd=REPO,
        env=recipe_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((folder / "data" / "train").glob(".tmp-shard-*")):  # it is writing
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "data" / "train" / "shard-00000-of-00001").exists()
    redone = prepare(f"--data.prepared_dir={folder}")
    assert redone.returncode == 0, redone.stderr
    assert not list(folder.rglob(".tmp-*"))  # the killed writer's folder is gone
    reference = tmp_path / "reference"
    prepare(f"--data.prepared_dir={reference}")
    assert rows_of(folder) == rows_of(reference)


def test_more_shards_than_rows_leaves_empty_shards_and_the_same_rows(
    tmp_path, monkeypatch, capsys, smoke_assets
):
    """4 shards of a 3-row eval split: one of them holds no rows, and the set reads the same
    rows as one shard (as N SLURM array tasks for a large train split and a short eval one)."""
    from clustertune import data_cli

    monkeypatch.chdir(REPO)
    config = ["--config", "recipes/configs/smoke/lora.yaml", "--data.max_eval_examples=3"]
    four, one = tmp_path / "four", tmp_path / "one"
    for index in range(4):
        shard = ["--shard", f"{index}/4"]
        assert data_cli.main(["prepare", *config, f"--data.prepared_dir={four}", *shard]) == 0
    out = capsys.readouterr().out
    assert "prepared data/eval shard 1 of 4: no rows (the split has 3 rows for 4 shards)" in out
    assert "(complete;" in out
    assert data_cli.main(["prepare", *config, f"--data.prepared_dir={one}"]) == 0
    assert rows_of(four) == rows_of(one) and len(rows_of(one)["eval"][0]) == 3


def test_a_damaged_or_foreign_shard_is_named_and_made_again(tmp_path):
    folder, other = tmp_path / "prepared", tmp_path / "other"
    assert prepare(f"--data.prepared_dir={folder}", "--shard", "0/2").returncode == 0
    assert prepare(f"--data.prepared_dir={folder}", "--shard", "1/2").returncode == 0
    reference = rows_of(folder)
    shard = folder / "data" / "train" / "shard-00001-of-00002"
    arrow = next(shard.glob("*.arrow"))
    head = arrow.read_bytes()[:1000]
    arrow.unlink()  # a new, truncated file (this process still maps the old one)
    arrow.write_bytes(head)
    redone = prepare(f"--data.prepared_dir={folder}")
    assert redone.returncode == 0, redone.stderr
    assert f"{shard} is damaged ({arrow.name} is 1000 bytes, not" in redone.stdout
    assert rows_of(folder) == reference
    # a shard copied from data prepared with other settings
    prepare(f"--data.prepared_dir={other}", "--shard", "0/2", "--data.max_length=900")
    shutil.rmtree(folder / "data" / "train" / "shard-00000-of-00002")
    shutil.copytree(
        other / "data" / "train" / "shard-00000-of-00002",
        folder / "data" / "train" / "shard-00000-of-00002",
    )
    redone = prepare(f"--data.prepared_dir={folder}")
    assert "is damaged (made for other settings)" in redone.stdout
    assert rows_of(folder) == reference


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data.max_length=900"],
            "holds data prepared with other settings (data.max_length: 1024 -> 900)",
        ),
        (["--shard", "2/2"], "--shard 2/2: I must be from 0 to N-1 (here 0 to 1)"),
        (["--shard", "1/3"], "is prepared in 2 shards; use --shard I/2"),
        (["--shard", "x"], "--shard x: write it as I/N"),
        (["--num_proc", "0"], "--num_proc=0: give at least 1 process"),
        (
            ["--data.train_file=missing.jsonl"],
            "data.train_file: file 'missing.jsonl' does not exist",
        ),
    ],
    ids=[
        "other settings",
        "shard out of range",
        "other shard count",
        "shard syntax",
        "num_proc",
        "missing file",
    ],
)
def test_bad_prepare_input_is_one_line(args, message, tmp_path):
    folder = tmp_path / "prepared"
    assert prepare(f"--data.prepared_dir={folder}", "--shard", "0/2").returncode == 0
    before = sorted(str(p) for p in folder.rglob("*"))
    result = prepare(f"--data.prepared_dir={folder}", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("clustertune: error: ") and message in lines[-1], result.stderr
    assert sorted(str(p) for p in folder.rglob("*")) == before  # nothing written


def test_training_reads_prepared_data_without_tokenising(tmp_path, monkeypatch):
    """Prepared by the command in 2 shards, the rows a Trainer sets up with are the prepared
    ones, and tokenisation is never called (it would raise here)."""
    from clustertune import data as data_lib
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.train import Trainer

    folder = tmp_path / "prepared"
    for index in (0, 1):
        assert prepare(f"--data.prepared_dir={folder}", "--shard", f"{index}/2").returncode == 0

    def no_tokenising(*args, **kwargs):
        raise AssertionError("training tokenised data that was prepared")

    monkeypatch.setattr(data_lib, "tokenize_dataset", no_tokenising)
    args = [
        "--config",
        AGENT_CONFIG,
        f"--output_dir={tmp_path / 'run'}",
        f"--data.prepared_dir={folder}",
        "--train.max_steps=1",
    ]
    trainer = Trainer(parse_config(FinetuneConfig, args))
    try:
        assert trainer.setup()
        assert trainer.data.prepared.root == folder
        assert trainer.data.train["input_ids"] == rows_of(folder)["train"][1]
    finally:
        trainer.runtime.shutdown()


# ----------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("by", ["examples", "tokens"])
def test_mixture_shares_match_the_weights_within_one_percent(by):
    rng = np.random.default_rng(0)
    lengths = [
        rng.integers(20, 400, 10_000),
        rng.integers(100, 900, 3_000),
        rng.integers(5, 60, 6_000),
    ]
    weights = [5.0, 3.0, 2.0]
    drawn, shares = draw_mixture(
        ["a", "b", "c"], lengths, weights, by=by, total_examples=10_000, seed=7
    )
    for share in shares:
        assert abs(share.share - share.weight_share) < 0.01, share
    if by == "examples":
        assert [len(d) for d in drawn] == [5000, 3000, 2000]
        assert shares[1].passes == 1.0  # b's 3,000 rows, each once
    assert drawn[2].max() < 6_000 and len(set(drawn[0].tolist())) == len(drawn[0])  # no repeats
    again, _ = draw_mixture(["a", "b", "c"], lengths, weights, by=by, total_examples=10_000, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(drawn, again, strict=True))  # any rank


def test_over_sampling_repeats_every_row_before_any_twice():
    lengths = [np.full(100, 10), np.full(1000, 10)]
    drawn, shares = draw_mixture(
        ["small", "big"], lengths, [1, 1], by="examples", total_examples=500, seed=0
    )
    small = np.bincount(drawn[0], minlength=100)
    assert shares[0].passes == 2.5 and small.min() == 2 and small.max() == 3


def test_mixture_config_mistakes_are_one_line():
    from clustertune.config import FinetuneConfig, parse_config

    cases = {
        "--data.mixture=[{train_file: a.jsonl, weight: -1}]": "data.mixture[0].weight=-1.0 must be positive",
        "--data.mixture=[{train_file: a.jsonl, wieght: 2}]": "did you mean 'data.mixture[0].weight'",
        "--data.mixture=[{weight: 2}]": "data.mixture[0] names no data",
        "--data.mixture=[{train_file: a.jsonl, format: chatt}]": "data.mixture[0].format='chatt' is not one of text, chat",
    }
    for arg, message in cases.items():
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config(FinetuneConfig, [arg])


def test_a_mixture_belongs_to_the_run_identity():
    """Another weight or source is another run: a resume names the change (and a run without a
    mixture keeps the fingerprint it had)."""
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.run_identity import changed_settings, fingerprint

    def config(weight: float) -> FinetuneConfig:
        mixture = f"[{{name: a, train_file: a.jsonl}}, {{name: b, train_file: b.jsonl, weight: {weight}}}]"
        return parse_config(FinetuneConfig, [f"--data.mixture={mixture}"])

    recorded = {"fingerprint": fingerprint(config(1.0))}
    assert changed_settings(recorded, config(1.0), total_steps=10) == {}
    changes = changed_settings(recorded, config(2.0), total_steps=10)
    assert changes == {"data.mixture[b].weight": (1.0, 2.0)}
    plain = fingerprint(parse_config(FinetuneConfig, ["--data.train_file=a.jsonl"]))
    assert not [key for key in plain if key.startswith("data.mixture")]


def test_a_seq2seq_model_refuses_a_mixture_source_of_conversations():
    from clustertune.config import FinetuneConfig, parse_config
    from clustertune.training_data import check_data_for_model

    mixture = (
        "[{name: dialogs, train_file: a.jsonl}, {name: chats, train_file: c.jsonl, format: chat}]"
    )
    cfg = parse_config(FinetuneConfig, [f"--data.mixture={mixture}"])
    with pytest.raises(UserError, match=r"data\.mixture\[chats\]\.format: chat conversations need"):
        check_data_for_model(cfg.data, "seq2seq")
    check_data_for_model(cfg.data, "causal")


def test_prepared_data_is_never_written_into_a_run(tmp_path):
    from clustertune.prepare.store import PreparedSet

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text("seed: 0\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    refused = prepare(f"--data.prepared_dir={run}")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert f"data.prepared_dir '{run}' holds the files of a run" in lines[0]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # not even a lock file
    with pytest.raises(UserError, match="the final/ of the training run"):
        PreparedSet.open(run / "final" / "prepared", {}, None, explicit=True)
    assert not (run / "final" / "prepared").exists()
