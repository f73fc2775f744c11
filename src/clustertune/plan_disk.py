"""What a run writes to disk: the size of one checkpoint and of final/, from the planner's
parameter counts (clustertune.plan), and the check before compute that output_dir can hold
them (train.py calls it before the batch-size search and step 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clustertune.config import FinetuneConfig
from clustertune.plan import ParamCounts, build_meta_model, count_model_params
from clustertune.run_folder import RunFolder
from clustertune.storage import OutputSizes, check_space, check_writable, remove_stale_probes

# A checkpoint holds, per trainable parameter, its fp32 value (DDP: the parameter itself; ZeRO:
# the fp32 master partition) and Adam's two fp32 moments: 4 + 8 = 12 bytes. E.g. flan-t5-base
# full fine-tuning: 12 x 247.6M = 2.8 GiB (+ 16-bit model states under ZeRO-1/2).
CHECKPOINT_BYTES_PER_TRAINABLE = 12
# Beside the tensors: trainer state, schedule, marker, DeepSpeed's recovery script (~40 KB)
# and, per rank, the RNG states (~20 KB).
CHECKPOINT_OVERHEAD_BYTES = 256 << 10
RNG_BYTES_PER_RANK = 32 << 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def output_sizes(
    counts: ParamCounts,
    *,
    zero_stage: int,
    weight_bytes: int,
    world_size: int,
    lora: bool,
    merge: bool,
    tokenizer_bytes: int,
    converts: bool,
    fsdp: bool = False,
) -> OutputSizes:
    """Bytes of one checkpoint, of final/, and of the universal form of a ZeRO checkpoint.

    P params, T trainable, w bytes per weight of the DeepSpeed module (2 in bf16/fp16, else 4).
    DDP / one process: 12T. ZeRO-1/2: + w P (mp_rank_00_model_states.pt holds every weight,
    frozen ones too). ZeRO-3: + w (P - T) (the frozen parameters' fragments). final/: the
    model (w P under DeepSpeed, whose state dict is 16-bit; 4 P otherwise) or the adapter (T),
    merged/ (4 P, merged in fp32) and the tokenizer files. A state dict DeepSpeed gathers
    holds a tied weight once per name (T5: shared, both embed_tokens and a tied lm_head), so
    under DeepSpeed the model may hold three more copies of its largest layer, the embedding
    (measured on the smoke T5 under ZeRO-2: 2,150,248 bytes for 366,848 parameters).
    FSDP2 (`fsdp`, zero_stage 0): the DCP checkpoint holds the whole fp32 model state, so
    + 4 (P - T) for the frozen parameters (a LoRA run's base)."""
    trainable, total = counts.trainable, counts.total
    module = {0: 0, 3: weight_bytes * (total - trainable)}.get(zero_stage, weight_bytes * total)
    if fsdp:
        module = 4 * (total - trainable)
    states = CHECKPOINT_BYTES_PER_TRAINABLE * trainable + module
    checkpoint = states + CHECKPOINT_OVERHEAD_BYTES + RNG_BYTES_PER_RANK * world_size
    final_weight = weight_bytes if zero_stage else 4
    tied_copies = 3 * counts.largest_layer if zero_stage else 0
    final = final_weight * (trainable if lora else total + tied_copies) + tokenizer_bytes
    if lora and merge:
        final += 4 * total
    return OutputSizes(checkpoint, final, states if converts else 0)


def _tokenizer_bytes(model_name: str) -> int:
    """The files of a local model folder other than its weights (tokenizer, configs): what
    final/ holds beside the weights. 0 for a hub id (small against the weights)."""
    folder = Path(model_name).expanduser()
    if not folder.is_dir():
        return 0
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
    )


def check_outputs_fit(
    cfg: FinetuneConfig,
    run: RunFolder,
    *,
    model_config: Any,
    world_size: int,
    zero_stage: int,
    dtype: str,
    converts: bool,
    fsdp: bool = False,
) -> None:
    """Before compute: checkpoints/ and final/ can be written, and the filesystem under
    output_dir has room for keep_last + 1 checkpoints or keep_last and final/."""
    for folder in (run.checkpoints, run.final):
        remove_stale_probes(folder)
        if folder.is_dir():
            check_writable(
                folder,
                f"{folder.name}/ of output_dir '{run.root}' ({folder})",
                "make it writable (the run writes into it), or use a new output_dir",
            )
    counts = count_model_params(build_meta_model(model_config, cfg.peft))
    sizes = output_sizes(
        counts,
        zero_stage=zero_stage,
        weight_bytes=2 if zero_stage and dtype in ("bf16", "fp16") else 4,
        world_size=world_size,
        lora=cfg.peft.method == "lora",
        merge=cfg.peft.merge_on_save,
        tokenizer_bytes=_tokenizer_bytes(cfg.model.name_or_path),
        converts=converts,
        fsdp=fsdp,
    )
    existing = len(run.complete_checkpoints())
    check_space(run.root, sizes, keep_last=max(1, cfg.checkpoint.keep_last), existing=existing)
