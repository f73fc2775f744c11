"""Evaluation recipe, fast tier: ids, batching and gathering logic, ROUGE wiring, bad inputs,
shipped configs, --compare. The multi-process runs are in test_evaluate_multiproc.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, describe, launch_command, run

from clustertune import rouge
from clustertune.config import FinetuneConfig, parse_config, write_resolved_config
from clustertune.errors import UserError
from clustertune.evaluation import (
    EvalDataConfig,
    EvaluateConfig,
    assign_ids,
    compare_runs,
    count_generated,
    example_scores,
    load_eval_set,
    make_batches,
    merge_predictions,
    pad_prompts,
    resolve_config,
)
from clustertune.evaluation.evaluator import _load_merged_adapter
from clustertune.sampler import deal_to_ranks as rank_batches

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"


def config(*overrides: str) -> EvaluateConfig:
    return parse_config(EvaluateConfig, list(overrides))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- ids


def test_ids_prefer_a_unique_id_then_fname_then_row_index():
    assert assign_ids({"id": ["a", "b"], "fname": ["x", "y"]}, 2) == (["a", "b"], "id")
    assert assign_ids({"id": ["a", "a"], "fname": ["x", "y"]}, 2) == (
        ["x", "y"],
        "fname",
    )  # id not unique
    assert assign_ids({"dialogue": ["d1", "d2", "d3"]}, 3) == (["0", "1", "2"], "row index")
    assert assign_ids({"id": [7, 8]}, 2) == (["7", "8"], "id")  # always strings (JSON keys, gather)


def test_explicit_id_column_must_exist_and_be_unique():
    assert assign_ids({"key": ["p", "q"]}, 2, "key") == (["p", "q"], "key")
    with pytest.raises(UserError, match="data.id_column='nope' is not a column"):
        assign_ids({"key": ["p"]}, 1, "nope")
    with pytest.raises(UserError, match="not unique.*'p'"):
        assign_ids({"key": ["p", "p"]}, 2, "key")


# ----------------------------------------------------------------------------- batching and gathering


def test_batches_sorted_longest_first_with_ties_by_position():
    lengths = [5, 9, 5, 1, 9, 3, 7]
    assert make_batches(lengths, 3, sort_by_length=True) == [[1, 4, 6], [0, 2, 5], [3]]
    assert make_batches(lengths, 3, sort_by_length=False) == [[0, 1, 2], [3, 4, 5], [6]]


def test_rank_batches_cover_every_batch_once_and_equalise_calls_for_zero3():
    batches = make_batches(list(range(23)), 4, sort_by_length=True)  # 6 batches, the last of 3
    for world_size in (1, 2, 4, 8):
        per_rank = [
            rank_batches(batches, world_size, rank, equal_calls=True) for rank in range(world_size)
        ]
        assert (
            len({len(mine) for mine in per_rank}) == 1
        )  # same number of generate calls everywhere
        real = sorted(tuple(b) for mine in per_rank for b, is_padding in mine if not is_padding)
        assert real == sorted(tuple(b) for b in batches)
        padding = [b for mine in per_rank for b, is_padding in mine if is_padding]
        assert all(b == batches[-1] for b in padding)  # the shortest batch is the repeated one
        ddp = [
            rank_batches(batches, world_size, rank, equal_calls=False) for rank in range(world_size)
        ]
        assert not any(is_padding for mine in ddp for _, is_padding in mine)


def test_merge_drops_duplicates_keeps_first_and_orders_by_id():
    ids = ["d", "a", "c", "b"]
    records = [
        ("a", "pa", 3),
        ("b", "pb", 1),
        ("a", "duplicate", 9),
        ("c", "pc", 2),
        ("d", "pd", 5),
    ]
    assert merge_predictions(records, ids) == ["pd", "pa", "pc", "pb"]
    with pytest.raises(RuntimeError, match="no prediction for 1 of 4"):
        merge_predictions(records[:4], ids)


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_simulated_ranks_give_identical_results_for_any_world_size(sort_by_length):
    """The whole plan -> generate -> gather -> merge path, generation replaced by a function of
    the batch (so a batch composed differently would show): same output for 1, 2, 3, 5 ranks."""
    ids = [f"ex{i}" for i in range(23)]
    lengths = [(i * 7) % 11 + 1 for i in range(23)]
    batches = make_batches(lengths, 4, sort_by_length)

    def fake_generate(batch):
        return [
            f"{ids[i]}|batch-of-{len(batch)}-max-{max(lengths[j] for j in batch)}" for i in batch
        ]

    results = []
    for world_size in (1, 2, 3, 5):
        gathered = []  # what gather_object returns: every rank's records concatenated
        for rank in range(world_size):
            for batch, is_padding in rank_batches(batches, world_size, rank, equal_calls=True):
                texts = fake_generate(batch)
                if not is_padding:
                    gathered += [(ids[i], t) for i, t in zip(batch, texts, strict=True)]
                else:  # what a bug that kept padding outputs would add; merge must ignore it
                    gathered += [(ids[i], "WRONG") for i in batch]
        results.append(merge_predictions(gathered, ids))
    assert all(r == results[0] for r in results)
    assert all("WRONG" not in text for text in results[0])


def test_padding_side_and_generated_token_counts():
    left = pad_prompts([[5, 6, 7], [8]], pad_token_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = pad_prompts([[5, 6, 7], [8]], pad_token_id=0, side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    # counts stop at the first EOS (inclusive), also when pad == eos (decoder-only tokenizers)
    new = torch.tensor([[4, 4, 1, 0], [4, 1, 1, 1], [4, 4, 4, 4]])
    assert count_generated(new, [1]) == [3, 2, 4]


# ----------------------------------------------------------------------------- ROUGE wiring


def test_multi_reference_scores_per_example_and_in_the_report():
    references = ["the cat sat on the mat", "a dog ran in the park", "the cat slept"]
    scores = example_scores("a dog ran in the park", references)
    assert scores["best_reference"]["rouge1"] == 100.0  # matches the second reference exactly
    assert scores["first_reference"]["rouge1"] < 50.0
    assert scores["first_reference"] == scores["per_reference"][0]
    mean = sum(s["rouge1"] for s in scores["per_reference"]) / 3
    assert scores["mean_over_references"]["rouge1"] == pytest.approx(mean, abs=1e-3)
    report = rouge.rouge_report(
        ["a dog ran in the park", "the cat"], [references, ["the cat"]], num_bootstrap=50
    )
    assert report["rouge1"] == report["protocols"]["best_reference"]["rouge1"] == 100.0
    assert report["protocols"]["first_reference"]["rouge1"] < 100.0
    assert report["references_per_example"] == {"min": 1, "max": 3, "mean": 2.0}


# ----------------------------------------------------------------------------- data


@pytest.fixture
def tokenizer(smoke_assets):
    from clustertune.modeling import load_tokenizer

    return load_tokenizer(str(smoke_assets["tiny_t5"]))


def resolved_data(**values) -> EvalDataConfig:
    args = ["--model.name_or_path=unused", *(f"--data.{k}={v}" for k, v in values.items())]
    return resolve_config(config(*args))[0].data


def test_eval_set_has_ids_references_and_training_truncation(smoke_assets, tokenizer):
    d = resolved_data(
        eval_file=smoke_assets["test"],
        reference_columns="[summary1,summary2,summary3]",
        max_examples=5,
        max_source_length=24,
    )
    eval_set = load_eval_set(d, tokenizer, "seq2seq")
    assert eval_set.ids == [f"test_{i}" for i in range(5)] and eval_set.id_source == "id"
    assert all(len(refs) == 3 for refs in eval_set.references)
    assert all(
        len(p) <= 24 and p[-1] == tokenizer.eos_token_id for p in eval_set.prompt_ids
    )  # EOS kept, as in training
    assert eval_set.num_truncated == 5 and eval_set.prompts[0].startswith(
        "Summarize the following conversation."
    )


def test_dataset_without_the_reference_column_is_one_clear_error(smoke_assets, tokenizer):
    d = resolved_data(eval_file=smoke_assets["validation"], reference_columns="[summary1,summary2]")
    with pytest.raises(
        UserError,
        match=r"data.reference_columns: .* has no column 'summary1', 'summary2' \(columns: id, dialogue, summary, topic\)",
    ):
        load_eval_set(d, tokenizer, "seq2seq")


def test_empty_eval_set_is_one_clear_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="data.eval_file: .* has no examples"):
        load_eval_set(resolved_data(eval_file=empty), tokenizer, "seq2seq")
    with pytest.raises(UserError, match="data.max_examples=0 leaves an empty eval set"):
        resolved_data(eval_file=empty, max_examples=0)


def test_missing_reference_value_and_missing_data_are_errors(tmp_path, tokenizer):
    rows = [{"dialogue": "hi", "summary": "s"}, {"dialogue": "yo", "summary": None}]
    path = write_jsonl(tmp_path / "holes.jsonl", rows)
    with pytest.raises(UserError, match="example '1' has no reference"):
        load_eval_set(resolved_data(eval_file=path), tokenizer, "seq2seq")
    with pytest.raises(UserError, match="no eval data"):
        resolve_config(config("--model.name_or_path=x"))


@pytest.mark.skipif(
    not (DIALOGSUM / "dialogsum.test.jsonl").is_file(), reason="needs ../shared/data/dialogsum"
)
def test_official_dialogsum_test_loads_with_three_references(tokenizer):
    d = resolved_data(
        eval_file=DIALOGSUM / "dialogsum.test.jsonl",
        reference_columns="[summary1,summary2,summary3]",
    )
    eval_set = load_eval_set(d, tokenizer, "seq2seq")
    assert (
        len(eval_set.ids) == 500 and eval_set.id_source == "fname" and eval_set.ids[0] == "test_0"
    )
    assert all(len(refs) == 3 and all(r.strip() for r in refs) for refs in eval_set.references)
    assert len({refs[0] for refs in eval_set.references}) > 490  # real, distinct summaries


# ----------------------------------------------------------------------------- model inputs


def fake_adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"})
    )
    return folder


def test_missing_adapter_path_is_one_clear_error(tmp_path, smoke_assets):
    with pytest.raises(UserError, match=r"model.adapter_path: '.*nowhere' does not exist"):
        resolve_config(
            config(
                f"--model.adapter_path={tmp_path / 'nowhere'}",
                f"--data.eval_file={smoke_assets['test']}",
            )
        )
    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(UserError, match="has no adapter_config.json"):
        resolve_config(
            config(
                f"--model.adapter_path={tmp_path / 'not_adapter'}",
                f"--data.eval_file={smoke_assets['test']}",
            )
        )


def test_adapter_for_another_base_is_refused_by_name(tmp_path, smoke_assets, monkeypatch):
    adapter = fake_adapter(tmp_path / "adapter", "google/flan-t5-base")
    args = [f"--model.adapter_path={adapter}", f"--data.eval_file={smoke_assets['test']}"]
    with pytest.raises(
        UserError, match="trained on base 'google/flan-t5-base', but model.name_or_path is"
    ):
        resolve_config(config(*args, f"--model.name_or_path={smoke_assets['tiny_t5']}"))
    # unset base: the adapter's own; a local copy of the base is allowed on request
    assert resolve_config(config(*args))[0].model.name_or_path == "google/flan-t5-base"
    allowed, notes = resolve_config(
        config(
            *args,
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            "--model.allow_base_mismatch=true",
        )
    )
    assert allowed.model.name_or_path == str(smoke_assets["tiny_t5"]) and notes
    # the same folder spelled differently (relative vs absolute) is the same base
    absolute = Path(smoke_assets["tiny_t5"]).resolve()
    adapter2 = fake_adapter(tmp_path / "adapter2", str(absolute))
    monkeypatch.chdir(absolute.parent)
    resolve_config(
        config(
            f"--model.adapter_path={adapter2}",
            f"--model.name_or_path={absolute.name}",
            f"--data.eval_file={smoke_assets['test']}",
        )
    )


def test_adapter_with_other_shapes_is_refused_on_load(tmp_path, smoke_assets):
    """An adapter trained on a different base (other width) fails to load: one sentence."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    base = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"])
    other_config = T5Config(**{**base.config.to_dict(), "d_model": 32, "d_kv": 8})
    other = get_peft_model(
        T5ForConditionalGeneration(other_config),
        LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, target_modules=["q", "v"]),
    )
    other.save_pretrained(tmp_path / "other_adapter")
    with pytest.raises(UserError, match=r"does not fit base model .*size mismatch"):
        _load_merged_adapter(base, str(tmp_path / "other_adapter"), str(smoke_assets["tiny_t5"]))


def fake_run(folder: Path, smoke_assets, peft: str) -> Path:
    cfg = parse_config(
        FinetuneConfig,
        [
            f"--model.name_or_path={smoke_assets['tiny_t5']}",
            f"--peft.method={peft}",
            "--data.prompt_template=Dialogue {dialogue} Summary",
            "--data.max_source_length=99",
        ],
    )
    write_resolved_config(cfg, folder / "config.yaml")
    final = folder / "final"
    final.mkdir()
    (final / "clustertune_final.json").write_text(
        json.dumps({"step": 1, "base_model": cfg.model.name_or_path})
    )
    if peft == "lora":
        (final / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": str(smoke_assets["tiny_t5"])})
        )
    return folder


def test_run_dir_gives_model_prompt_and_truncation(tmp_path, smoke_assets):
    data = f"--data.eval_file={smoke_assets['test']}"
    lora, notes = resolve_config(
        config(
            f"--run_dir={fake_run(tmp_path / 'lora', smoke_assets, 'lora')}",
            data,
            "--model.name_or_path=something/else",
        )
    )
    assert lora.model.adapter_path == str(tmp_path / "lora" / "final")
    assert (
        lora.model.name_or_path == str(smoke_assets["tiny_t5"])
        and "run_dir sets the model" in notes[0]
    )
    assert (
        lora.data.prompt_template == "Dialogue {dialogue} Summary"
        and lora.data.max_source_length == 99
    )
    full, _ = resolve_config(
        config(
            f"--run_dir={fake_run(tmp_path / 'full', smoke_assets, 'none')}",
            data,
            "--data.max_source_length=64",
        )
    )
    assert (
        full.model.name_or_path == str(tmp_path / "full" / "final")
        and full.model.adapter_path is None
    )
    assert full.data.max_source_length == 64  # set explicitly: wins over the run's value
    unfinished = tmp_path / "unfinished"
    write_resolved_config(FinetuneConfig(), unfinished / "config.yaml")
    with pytest.raises(UserError, match="has no complete final/"):
        resolve_config(config(f"--run_dir={unfinished}", data))


# ----------------------------------------------------------------------------- configs and CLI


EVAL_CONFIGS = sorted((REPO / "recipes" / "configs").rglob("*evaluate.yaml"))


def test_every_model_folder_has_an_eval_config():
    assert {p.parent.name for p in EVAL_CONFIGS} >= {
        "smoke",
        "flan_t5_base",
        "qwen2_5_0_5b",
        "qwen3_0_6b",
    }


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_eval_configs_load(path):
    assert path.read_text().startswith("#")
    assert "recipes/evaluate.py" in "".join(path.read_text().splitlines()[:8])
    cfg = parse_config(EvaluateConfig, ["--config", str(path)])
    chat = cfg.data.format == "chat"
    assert cfg.model.name_or_path and (cfg.data.reference_columns or chat) and cfg.batch_size > 0
    if path.parent.name == "smoke" and path.stem == "evaluate":
        assert cfg.data.reference_columns == ["summary1", "summary2", "summary3"]
        assert (cfg.batch_size, cfg.generation.max_new_tokens) == (32, 64)


def test_batch_size_is_a_number_or_auto_with_a_sane_margin(smoke_assets):
    base = ["--model.name_or_path=google/flan-t5-base", "--data.eval_file=x.jsonl"]
    assert resolve_config(config(*base, "--batch_size=auto"))[0].batch_size == "auto"
    with pytest.raises(UserError, match="batch_size='big' must be a number or auto"):
        resolve_config(config(*base, "--batch_size=big"))
    with pytest.raises(UserError, match="auto_batch_margin=1.0 must be in"):
        resolve_config(config(*base, "--batch_size=auto", "--auto_batch_margin=1"))
    with pytest.raises(UserError, match="batch_size=0 must be at least 1"):
        resolve_config(config(*base, "--batch_size=0"))


def test_unknown_key_gets_a_suggestion():
    with pytest.raises(UserError, match="did you mean 'generation.num_beams'"):
        config("--generation.num_beam=4")


def test_cli_bad_input_exits_2_with_one_line(tmp_path, smoke_assets):
    adapter = fake_adapter(tmp_path / "adapter", "google/flan-t5-base")
    result = run(
        launch_command(
            "recipes/evaluate.py",
            [
                "--config",
                "recipes/configs/smoke/evaluate.yaml",
                f"--model.adapter_path={adapter}",
                f"--output_dir={tmp_path / 'out'}",
            ],
        )
    )
    assert result.returncode == 2, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained on base 'google/flan-t5-base'" in lines[0], describe(result)


def fake_report(scale: float, source: str = "test.jsonl") -> dict:
    report = rouge.rouge_report(
        ["the cat sat", "a dog ran"][:2], [["the cat sat on the mat"], ["a dog"]], num_bootstrap=20
    )
    for metric in rouge.METRICS:
        report[metric] = round(report[metric] * scale, 4)
    report["dataset"] = {"source": source, "num_examples": 2}
    report["throughput"] = {"examples_per_second": 3.0}
    return report


def test_compare_writes_table_markdown_and_chart(tmp_path):
    for name, scale, source in (
        ("base", 0.5, "test.jsonl"),
        ("lora", 1.0, "test.jsonl"),
        ("odd", 1.0, "other.jsonl"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rouge.json").write_text(json.dumps(fake_report(scale, source)))
    text = compare_runs(
        [str(tmp_path / "base"), str(tmp_path / "lora")], ["base", "lora"], tmp_path / "cmp"
    )
    assert "| metric" in text and "base" in text and "lora" in text and "(+" in text
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("| rouge") >= 4
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    warned = compare_runs([str(tmp_path / "base"), str(tmp_path / "odd")], None, tmp_path / "cmp2")
    assert "odd differs from base in dataset.source" in warned
    with pytest.raises(UserError, match="has no rouge.json"):
        compare_runs([str(tmp_path)], None, tmp_path / "cmp3")
    with pytest.raises(UserError, match="--labels has 1 names for 2 folders"):
        compare_runs([str(tmp_path / "base"), str(tmp_path / "lora")], ["x"], tmp_path / "cmp4")


def test_compare_recipe_and_evaluate_compare_are_one_command(tmp_path):
    for name, scale in (("base", 0.5), ("lora", 1.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rouge.json").write_text(json.dumps(fake_report(scale)))
    folders, labels = [str(tmp_path / "base"), str(tmp_path / "lora")], ["--labels", "base,lora"]
    outputs = []
    for script, args in (
        ("recipes/compare.py", folders),
        ("recipes/evaluate.py", ["--compare", *folders]),
    ):
        out = tmp_path / f"cmp-{Path(script).stem}"
        result = run(launch_command(script, [*args, *labels, "--out", str(out)]))
        assert result.returncode == 0, describe(result)
        assert (out / "comparison.md").is_file() and (out / "comparison.png").is_file()
        outputs.append(result.stdout.replace(str(out), "OUT"))
    assert outputs[0] == outputs[1] and "| rouge1" in outputs[0]
    missing = run(launch_command("recipes/compare.py", [str(tmp_path / "nowhere")]))
    assert missing.returncode == 2 and "has no rouge.json" in missing.stderr, describe(missing)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        config("--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--num_bootstrap" in text and "--model.dtype {auto,bf16,fp32,fp16}" in text
