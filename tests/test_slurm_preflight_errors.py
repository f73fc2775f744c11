"""clustertune-submit mistakes caught before anything is submitted (issue 12): a recipe
without `--`, a world size no micro-batch size fits, and an evaluation config the job
after the training would refuse. No SLURM needed: preflight runs before submission."""

from __future__ import annotations

import pytest
from test_slurm_submit import RECIPE, submit

from clustertune.errors import UserError
from clustertune.sampler import check_batch_arithmetic

CLUSTER = ["--config", "slurm/dev-cluster.yaml"]


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    assert err.startswith("clustertune: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return err.strip()


def test_recipe_without_separator_shows_the_command_with_it(capsys, no_slurm):
    err = one_line_error(*submit(capsys, *CLUSTER, *RECIPE))
    assert "'recipes/finetune.py' looks like the recipe: put -- before the recipe" in err
    assert err.endswith(
        "e.g. clustertune-submit --config slurm/dev-cluster.yaml -- recipes/finetune.py "
        "--config recipes/configs/smoke/lora.yaml"
    )


def test_misspelled_option_is_one_line_with_the_nearest(capsys, no_slurm):
    err = one_line_error(*submit(capsys, *CLUSTER, "--nodez", "2", "--", *RECIPE))
    assert "unrecognized arguments: --nodez 2; did you mean --nodes?" in err
    err = one_line_error(*submit(capsys, *CLUSTER, "--nodes", "two", "--", *RECIPE))
    assert "argument --nodes: invalid int value: 'two'" in err


def test_world_size_no_micro_batch_fits_names_global_sizes_that_do(capsys, no_slurm):
    err = one_line_error(
        *submit(capsys, *CLUSTER, "--nodes", "3", "--processes-per-node", "1", "--", *RECIPE)
    )
    assert "train.global_batch_size=16 is not divisible by micro_batch_size=8 x world_size=3" in err
    assert "no micro_batch_size works, since 16 is not a multiple of world_size=3" in err
    assert "e.g. 15 or 18 (or 24 to keep micro_batch_size=8)" in err
    assert "in none" not in err


def test_the_nearest_global_sizes_are_valid():
    """Every global batch size the message proposes passes the same rule."""
    for global_batch, micro, world in [(16, 8, 3), (2, 1, 3), (100, 16, 8), (7, 1, 2)]:
        with pytest.raises(UserError) as refused:
            check_batch_arithmetic(global_batch, micro, world)
        proposed = str(refused.value).split("e.g. ")[1].split(", or change")[0]
        sizes = [int(word) for word in proposed.replace("(", " ").split() if word.isdigit()]
        assert sizes, refused.value
        for size in sizes:
            assert check_batch_arithmetic(size, 1, world) == size // world
    # with a micro-batch size that fits, the message still lists those that do
    with pytest.raises(UserError, match=r"use a micro_batch_size in \[1, 3, 5, 15\]"):
        check_batch_arithmetic(30, 4, 2)


def dry_run_then_evaluate(capsys, *eval_args: str) -> tuple[int, str, str]:
    return submit(
        capsys,
        *CLUSTER,
        "--processes-per-node",
        "1",
        "--launch",
        "launch/ddp.yaml",
        "--then",
        "evaluate",
        *eval_args,
        "--dry-run",
        "--",
        *RECIPE,
    )


def test_then_evaluate_without_eval_data_is_refused(capsys, no_slurm):
    err = one_line_error(*dry_run_then_evaluate(capsys))
    assert "--then evaluate without --eval-config: no eval data: set data.eval_file" in err
    assert "give an evaluation config with --eval-config" in err


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data:\n  eval_fil: x.jsonl\n", "unknown config key 'data.eval_fil'"),
        ("generation:\n  top_p: 2\n", "generation.top_p=2.0 must be in (0, 1]"),
        ("batch_size: big\n", "batch_size='big' must be a number or auto"),
        ("model:\n  name_or_path: x\n", "no eval data"),
        ("data:\n  eval_file: no/such.jsonl\n", "data.eval_file 'no/such.jsonl' does not exist"),
        (
            # the training prompt reads {dialogue}; an eval source_column must match it
            "data:\n  eval_file: .cache/smoke/data/test.jsonl\n  source_column: text\n",
            "data.prompt_template has no {text} placeholder for data.source_column='text'",
        ),
    ],
)
def test_eval_config_is_checked_before_submission(capsys, no_slurm, tmp_path, yaml_text, message):
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(yaml_text)
    code, out, err = dry_run_then_evaluate(capsys, "--eval-config", str(eval_config))
    err = one_line_error(code, out, err)
    assert err.startswith(f"clustertune: error: --eval-config {eval_config}: "), err
    assert message in err
    assert "sbatch file" not in out  # refused before the dry run renders anything


def test_a_good_eval_config_passes(capsys, no_slurm, tmp_path):
    code, out, err = dry_run_then_evaluate(
        capsys, "--eval-config", "recipes/configs/smoke/evaluate.yaml"
    )
    assert code == 0, err
    assert "# ---- sbatch file of the evaluation job" in out
