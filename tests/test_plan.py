"""The memory planner: parameter counts, DeepSpeed's own estimator numbers, the recommendation."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO, recipe_env, run

from clustertune.config import FinetuneConfig, ModelConfig, PeftConfig, TrainConfig
from clustertune.errors import UserError
from clustertune.plan import (
    BUILTIN_CONFIGS,
    GIB,
    MAX_STATE_SHARE,
    SINGLE_GPU,
    STRATEGIES,
    Cluster,
    ParamCounts,
    _formula_bytes,
    build_meta_model,
    count_model_params,
    estimate_strategy,
    load_plan_model_config,
    make_plan,
)
from clustertune.plan_cli import format_plan
from clustertune.plan_fsdp import ShardGroups, count_shard_groups

FLAN_T5_BASE_PARAMS = 247_577_856
BY_KEY = {s.key: s for s in STRATEGIES}
SHAPES = [(8, 1), (2, 1), (4, 2), (1, 1)]  # (gpus per node, nodes)


@pytest.fixture(scope="module")
def base_counts() -> ParamCounts:
    config, _ = load_plan_model_config("google/flan-t5-base")
    return count_model_params(build_meta_model(config, PeftConfig()))


def test_flan_t5_base_parameter_count(base_counts):
    """247,577,856 with FLAN-T5's own lm_head: a model built from the config alone ties the
    head to `shared` in transformers 5 and counts one 32,128 x 768 matrix less."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(**BUILTIN_CONFIGS["google/flan-t5-base"]))
    tied = sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.shared.weight and tied == FLAN_T5_BASE_PARAMS - 32128 * 768
    model.lm_head.weight = torch.nn.Parameter(torch.empty(32128, 768, device="meta"))
    assert sum(p.numel() for p in model.parameters()) == FLAN_T5_BASE_PARAMS
    assert base_counts == ParamCounts(
        FLAN_T5_BASE_PARAMS, FLAN_T5_BASE_PARAMS, 32128 * 768, "shared"
    )


def test_builtin_configs_are_flan_t5_shapes():
    expected = {  # (d_model, d_ff, layers, heads): the checkpoints' config.json
        "google/flan-t5-small": (512, 1024, 8, 6),
        "google/flan-t5-base": (768, 2048, 12, 12),
        "google/flan-t5-large": (1024, 2816, 24, 16),
        "google/flan-t5-xl": (2048, 5120, 24, 32),
    }
    for name, shape in expected.items():
        config, source = load_plan_model_config(name)
        assert source == "built-in config"
        assert (config.d_model, config.d_ff, config.num_layers, config.num_heads) == shape
        assert (config.d_kv, config.vocab_size, config.num_decoder_layers) == (64, 32128, shape[2])
        assert config.is_gated_act and config.scale_decoder_outputs is False  # untied head


@pytest.mark.parametrize(
    "name,params,hidden",
    [
        # embedding 151,936 x 1,024 (tied head) + 28 x 15,730,944 + final norm 1,024
        ("Qwen/Qwen3-0.6B", 151936 * 1024 + 28 * 15_730_944 + 1024, 1024),
        # embedding 151,936 x 896 (tied head) + 24 x 14,912,384 + final norm 896
        ("Qwen/Qwen2.5-0.5B-Instruct", 151936 * 896 + 24 * 14_912_384 + 896, 896),
    ],
)
def test_builtin_qwen_configs_count_the_checkpoints(name, params, hidden):
    """The shipped qwen configs plan offline: 596,049,920 and 494,032,768 parameters, as the
    checkpoints hold; the head is tied, so the embedding is counted once."""
    config, source = load_plan_model_config(name)
    counts = count_model_params(build_meta_model(config, PeftConfig()))
    assert source == "built-in config" and config.tie_word_embeddings
    assert params in (596_049_920, 494_032_768)
    assert counts == ParamCounts(params, params, 151936 * hidden, "model.embed_tokens")


@pytest.mark.parametrize("gpus_per_node,nodes", SHAPES)
def test_zero2_and_zero3_rows_are_deepspeeds_numbers(base_counts, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cluster = Cluster(gpus_per_node, nodes, 80)
    total, largest = FLAN_T5_BASE_PARAMS, 32128 * 768
    expected = {
        "zero2": estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, False, 1.5),
        "zero2_offload": estimate_zero2_model_states_mem_needs(
            total, gpus_per_node, nodes, True, 1.5
        ),
        # zero_init False: T5 is loaded whole on every rank (modeling.supports_zero3_init)
        "zero3": estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, False, False, False, 1.5
        )[:2],
        "zero3_offload_optimizer": estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, True, False, False, 1.5
        )[:2],
        "zero3_offload": estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, True, True, False, 1.5
        )[:2],
    }
    for key, (cpu, gpu) in expected.items():
        estimate = estimate_strategy(BY_KEY[key], base_counts, cluster, "bf16", zero_init=False)
        assert (estimate.source, estimate.cpu_bytes_per_node, estimate.gpu_bytes) == (
            "deepspeed",
            cpu,
            gpu,
        ), key


@pytest.mark.parametrize("gpus_per_node", [1, 2, 8])
@pytest.mark.parametrize("zero_init", [False, True])
def test_formula_reproduces_deepspeed_for_a_full_bf16_fine_tune(
    base_counts, gpus_per_node, zero_init
):
    """The formula used for LoRA and fp32 gives DeepSpeed's numbers where both apply (one node;
    across nodes DeepSpeed's zero2-offload CPU term scales with all GPUs, ours per node)."""
    cluster = Cluster(gpus_per_node, 1, 80)
    for strategy in STRATEGIES:
        if strategy.fsdp2 or strategy.zero_stage < 2:  # FSDP2: plan_fsdp, tested below
            continue
        deepspeed = estimate_strategy(strategy, base_counts, cluster, "bf16", zero_init)
        cpu, gpu = _formula_bytes(strategy, base_counts, cluster, 2, zero_init)
        assert gpu == deepspeed.gpu_bytes and abs(cpu - deepspeed.cpu_bytes_per_node) <= 1, (
            strategy.key
        )


def test_ddp_and_zero1_arithmetic(base_counts):
    params = FLAN_T5_BASE_PARAMS
    eight = Cluster(8, 1, 80)
    # DDP: fp32 weights 4 + grads 4 + DDP buckets 4 + Adam 8; one process has no buckets
    assert (
        estimate_strategy(BY_KEY["ddp"], base_counts, eight, "bf16", False).gpu_bytes == 20 * params
    )
    assert (
        estimate_strategy(SINGLE_GPU, base_counts, Cluster(1, 1, 80), "bf16", False).gpu_bytes
        == 16 * params
    )
    # ZeRO-1, bf16: weights 2 + grads 2 on every rank + 16 B of fp32 optimizer state / 8
    assert (
        estimate_strategy(BY_KEY["zero1"], base_counts, eight, "bf16", False).gpu_bytes
        == 4 * params + 2 * params
    )
    # fp32: DeepSpeed's 16-bit estimators do not apply; 4-byte weights and gradients
    fp32 = estimate_strategy(BY_KEY["zero2"], base_counts, eight, "fp32", False)
    assert (fp32.source, fp32.gpu_bytes) == ("formula", 4 * params + 20 * params // 8)


# flan-t5-base's FSDP2 groups: the root holds shared and lm_head (32,128 x 768 each) and the
# two final norms (768 each); the largest block is a decoder T5Block: self- and
# cross-attention 2 x 4 x 768 x 768, gated FF 3 x 768 x 2,048, 3 norms of 768 and block 0's
# relative attention bias 32 x 12.
FLAN_T5_BASE_ROOT = 2 * 32128 * 768 + 2 * 768  # 49,350,144
FLAN_T5_BASE_BLOCK = 8 * 768 * 768 + 3 * 768 * 2048 + 3 * 768 + 32 * 12  # 9,439,872


def test_fsdp2_rows_shard_like_zero3_and_gather_the_root_and_a_block(base_counts):
    config, _ = load_plan_model_config("google/flan-t5-base")
    groups = count_shard_groups(build_meta_model(config, PeftConfig()), config)
    assert groups == ShardGroups(
        "T5Block", 24, FLAN_T5_BASE_BLOCK, FLAN_T5_BASE_BLOCK, FLAN_T5_BASE_ROOT, FLAN_T5_BASE_ROOT
    )
    params, gathered = FLAN_T5_BASE_PARAMS, FLAN_T5_BASE_ROOT + FLAN_T5_BASE_BLOCK
    eight = Cluster(8, 1, 80)

    def row(key, precision="bf16", accumulates=False):
        return estimate_strategy(
            BY_KEY[key],
            base_counts,
            eight,
            precision,
            False,
            groups=groups,
            accumulates=accumulates,
        )

    fsdp2 = row("fsdp2")
    # fp32 shards of weights 4 + gradients 4 + Adam 8 = 16 B/param over 8 ranks, + the bf16
    # weights and gradients of the root and one block: 495,155,712 + 235,160,064 B = 0.68 GiB
    assert fsdp2.gpu_bytes == 16 * params // 8 + 2 * 2 * gathered == 730_315_776
    # ZeRO-3's estimator shards 18 B/param (the 16-bit copy besides) and adds its largest layer
    zero3 = row("zero3")
    assert zero3.gpu_bytes - 2 * 2 * base_counts.largest_layer == 18 * params // 8
    # every rank loads the fp32 checkpoint (x 1.5 slack); while it is sharded a GPU holds the
    # fp32 shards and one whole group in fp32 (the root, the largest)
    assert (fsdp2.cpu_bytes_per_node, fsdp2.startup_gpu_bytes) == (
        int(1.5 * 4 * params * 8),
        4 * params // 8 + 4 * FLAN_T5_BASE_ROOT,
    )
    # a step of several micro-batches keeps every fp32 gradient unsharded between them
    assert row("fsdp2", accumulates=True).gpu_bytes == fsdp2.gpu_bytes + 4 * params
    assert row("fsdp2", "fp32").gpu_bytes == 16 * params // 8 + 2 * 4 * gathered
    # offload: the shards in CPU memory, max(each rank's fp32 load, the node's 8 shards)
    offload = row("fsdp2_offload")
    assert (offload.gpu_bytes, offload.startup_gpu_bytes) == (2 * 2 * gathered, 0)
    assert offload.cpu_bytes_per_node == int(1.5 * max(4 * params * 8, 16 * params))
    assert all(e.source == "formula" for e in (fsdp2, offload))


def test_fsdp2_with_lora_shards_the_frozen_base_in_fp32():
    cfg = FinetuneConfig(
        peft=PeftConfig(method="lora", r=32, target_modules=["q", "v"]),
        train=TrainConfig(global_batch_size=64, micro_batch_size=8),
    )
    plan = make_plan(cfg, Cluster(8, 1, 80))
    total, trainable = plan.counts.total, plan.counts.trainable
    # a decoder block's adapters: q and v of self- and cross-attention, 4 x 32 x (768 + 768)
    block_adapters = 4 * 32 * (768 + 768)
    assert plan.shard_groups == ShardGroups(
        "T5Block",
        24,
        FLAN_T5_BASE_BLOCK + block_adapters,
        block_adapters,
        FLAN_T5_BASE_ROOT,
        0,
    )
    fsdp2 = next(e for e in plan.estimates if e.strategy.key == "fsdp2")
    # global 64 = micro 8 x 8 ranks: one micro-batch, no unsharded gradients
    assert plan.grad_accum_steps == 1
    weights = 2 * (FLAN_T5_BASE_ROOT + FLAN_T5_BASE_BLOCK + block_adapters)
    assert fsdp2.gpu_bytes == (4 * total + 12 * trainable) // 8 + weights + 2 * block_adapters


def test_recommendation_picks_fsdp2_between_zero2_and_zero3():
    """flan-t5-xl (2.85B) on 8 x 16 GiB: ZeRO-2 needs 11.3 GiB of the 9.6 allowed; FSDP2 needs
    16 B x 2.85B / 8 = 5.3 GiB + the root and a block gathered = 6.0, under ZeRO-3's 6.2. With
    two micro-batches a step FSDP2 keeps 4 B/param of unsharded gradients (+10.6 GiB): ZeRO-3.
    On 16 x 8 GiB FSDP2's states fit (3.4 of 4.8 GiB), and so does its start-up (the fp32
    shards and the root group whole, 1.2 GiB): FSDP2."""

    def plan(micro, gpus, memory, global_batch=32):
        model = ModelConfig(name_or_path="google/flan-t5-xl")
        train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro)
        return make_plan(FinetuneConfig(model=model, train=train), Cluster(gpus, 1, memory))

    def rows(p):
        return {e.strategy.key: e for e in p.estimates}

    one_micro_batch = plan(4, 8, 16)
    fitting = rows(one_micro_batch)
    assert one_micro_batch.recommended.strategy.key == "fsdp2"
    assert not fitting["zero2"].fits and fitting["zero3"].fits
    assert fitting["fsdp2"].gpu_bytes < fitting["zero3"].gpu_bytes
    two_micro_batches = plan(2, 8, 16)
    assert two_micro_batches.grad_accum_steps == 2
    assert two_micro_batches.recommended.strategy.key == "zero3"
    fsdp2 = rows(two_micro_batches)["fsdp2"]
    assert fsdp2.gpu_bytes - fitting["fsdp2"].gpu_bytes == 4 * one_micro_batch.counts.total
    start_up = plan(4, 16, 8, global_batch=64)
    fsdp2 = rows(start_up)["fsdp2"]
    assert fsdp2.gpu_bytes <= start_up.state_budget_bytes and fsdp2.fits
    assert fsdp2.startup_gpu_bytes < 2 * GIB and start_up.recommended.strategy.key == "fsdp2"
    assert "does not fit at start-up" not in format_plan(start_up, None, "")


def test_lora_counts_adapters_and_uses_the_formula():
    cfg = FinetuneConfig(peft=PeftConfig(method="lora", r=32, target_modules=["q", "v"]))
    plan = make_plan(cfg, Cluster(8, 1, 80))
    # q and v in 12 encoder self-attentions + 12 decoder self- and 12 cross-attentions:
    # 36 x 2 x r x (768 in + 768 out) = 3,538,944 (the lora.yaml comment's "3.5M of 251M")
    trainable = 36 * 2 * 32 * (768 + 768)
    assert (plan.counts.trainable, plan.counts.total) == (
        trainable,
        FLAN_T5_BASE_PARAMS + trainable,
    )
    assert {e.source for e in plan.estimates} == {"formula"}
    ddp = plan.estimates[0]
    assert (
        ddp.gpu_bytes == 4 * plan.counts.total + 16 * trainable
    )  # frozen fp32 weights need 4 B only
    assert plan.recommended.strategy.key == "ddp"


def test_recommendation_moves_to_more_sharding_as_memory_shrinks():
    """flan-t5-xl (2.85B) on 8 GPUs: 20 B/param DDP = 53 GiB exceeds 60% of 80 GiB."""
    cfg = FinetuneConfig(model=ModelConfig(name_or_path="google/flan-t5-xl"))
    chosen = {}
    for memory in (80, 16, 8, 0.1):
        plan = make_plan(cfg, Cluster(8, 1, memory))
        chosen[memory] = plan.recommended.strategy.key if plan.recommended else None
        if plan.recommended:
            assert plan.recommended.gpu_bytes <= MAX_STATE_SHARE * memory * GIB
            assert all(
                not e.fits or not e.strategy.launch_file
                for e in plan.estimates[: plan.estimates.index(plan.recommended)]
            )
    assert chosen == {80: "zero1", 16: "zero3", 8: "zero3_offload", 0.1: None}


def test_cli_prints_the_table_and_the_launch_command(tmp_path):
    args = ["--config", "recipes/configs/flan_t5_base/full.yaml", "--train.micro_batch_size=4"]
    result = run(
        [
            sys.executable,
            str(REPO / "recipes/plan.py"),
            *args,
            "--gpus-per-node",
            "8",
            "--nodes",
            "1",
            "--gpu-memory-gib",
            "80",
            "--json",
            str(tmp_path / "plan.json"),
        ],
        env=recipe_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for strategy in STRATEGIES:
        assert strategy.label in result.stdout
    command = (
        "clustertune-launch --config_file launch/ddp.yaml --num_processes 8 recipes/finetune.py "
        "--config recipes/configs/flan_t5_base/full.yaml --train.micro_batch_size=4"
    )
    assert f"  {command}\n" in result.stdout
    assert "batch: global 64 = micro 4 x accum 2 x 8 GPUs" in result.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert (saved["recommended"], saved["command"], saved["params"]["total"]) == (
        "ddp",
        command,
        FLAN_T5_BASE_PARAMS,
    )
    rows = {row["key"]: row for row in saved["estimates"]}
    assert rows["fsdp2"]["launch_file"] == "launch/fsdp2.yaml" and rows["fsdp2"]["fits"]
    assert rows["fsdp2_offload"]["offload_params"] and rows["fsdp2"]["zero_stage"] is None
    assert (
        rows["fsdp2"]["startup_gpu_bytes"] == 4 * FLAN_T5_BASE_PARAMS // 8 + 4 * FLAN_T5_BASE_ROOT
    )
    assert saved["fsdp2_shard_groups"]["root"] == FLAN_T5_BASE_ROOT
    assert saved["grad_accum_steps"] == 2  # global 64 = micro 4 x accum 2 x 8 GPUs
    for launch_file in {s.launch_file for s in (*STRATEGIES, SINGLE_GPU)} - {None}:
        assert (REPO / launch_file).is_file()


def test_multi_node_command_names_the_machines(capsys):
    from clustertune.plan_cli import main

    assert (
        main(
            [
                "--config",
                str(REPO / "recipes/configs/flan_t5_base/lora.yaml"),
                "--train.micro_batch_size=2",
                "--gpus-per-node",
                "8",
                "--nodes",
                "2",
                "--gpu-memory-gib",
                "40",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "--config_file launch/ddp.yaml --num_processes 16 --num_machines 2 --machine_rank $NODE_RANK"
        in out
    )
    assert "batch: global 64 = micro 2 x accum 2 x 16 GPUs" in out


def test_a_local_model_folder_counts_what_from_pretrained_loads(smoke_assets):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for key, auto_class in (
        ("tiny_t5", AutoModelForSeq2SeqLM),
        ("tiny_causal", AutoModelForCausalLM),
    ):
        cfg = FinetuneConfig(model=ModelConfig(name_or_path=str(smoke_assets[key])))
        plan = make_plan(cfg, Cluster(2, 1, 16))
        loaded = auto_class.from_pretrained(smoke_assets[key])
        assert plan.model_source == "local folder"
        assert plan.counts.total == sum(p.numel() for p in loaded.parameters()), key
        assert plan.recommended.strategy.key == "ddp"


def test_unknown_hub_id_asks_for_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local folder"):
        load_plan_model_config("nobody/not-a-cached-model")


def test_bad_input_exits_2_with_one_line(capsys):
    from clustertune.plan_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                str(REPO / "recipes/configs/flan_t5_base/full.yaml"),
                "--model.dtpye=fp32",
                "--gpus-per-node",
                "8",
                "--gpu-memory-gib",
                "80",
            ]
        )
    assert exit_info.value.code == 2
    assert "did you mean 'model.dtype'" in capsys.readouterr().err
    with pytest.raises(UserError, match="fp16"):
        make_plan(FinetuneConfig(model=ModelConfig(dtype="fp16")), Cluster(8, 1, 80))
