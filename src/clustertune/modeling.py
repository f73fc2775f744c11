"""Building the model: kind (seq2seq or causal) from its config, precision, dropout, LoRA."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from clustertune.config import ModelConfig, PeftConfig
from clustertune.errors import UserError
from clustertune.run_folder import RunFolder

T5_FAMILY = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}


def _explain_load_error(name: str, error: Exception) -> UserError:
    first_line = (
        str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    )
    offline = (
        " (HF_HUB_OFFLINE is set: the model must already be in the HF cache)"
        if os.environ.get("HF_HUB_OFFLINE")
        else ""
    )
    return UserError(
        f"model.name_or_path: cannot load '{name}'{offline}: {first_line}. Give a folder with "
        "config.json and weights, or a hub id reachable from this machine."
    )


def _is_local_path(name: str) -> bool:
    """Whether `name` means a folder on this machine rather than a hub id ("org/model").
    The hub client treats every non-existing path as a repo id and answers "Repo id must
    be in the form ...", which tells a user with a typo in a path nothing."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") >= 2:
        return True
    return "/" in name and path.parent.is_dir()  # "outputs/run_a" where outputs/ is here


def _adapter_base(folder: Path) -> str | None:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError):
        return None


def check_model_folder(name: str) -> None:
    """For a local model.name_or_path: refuse what from_pretrained would misreport (a missing
    path, a file, an empty folder, a LoRA adapter, a training output_dir) with the fix."""
    if not _is_local_path(name):
        return
    folder = Path(name).expanduser()
    from clustertune.smoke import missing_smoke_asset_hint

    smoke_hint = missing_smoke_asset_hint(name)
    if not folder.exists():
        fix = smoke_hint or (
            "give a model folder (config.json and weights, as save_pretrained writes them) or a "
            "hub id such as google/flan-t5-base."
        )
        raise UserError(f"model.name_or_path: cannot load '{name}': it does not exist; {fix}")
    if not folder.is_dir():
        raise UserError(
            f"model.name_or_path: cannot load '{name}': it is a file; give the folder holding "
            "config.json and the weights."
        )
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        base = _adapter_base(folder) or "the base model"
        raise UserError(
            f"model.name_or_path: cannot load '{name}': it is a LoRA adapter (adapter_config.json; "
            f"base '{base}'), not a model: to evaluate it, set model.adapter_path={name} instead "
            f"(the base is read from the adapter); to fine-tune, start from model.name_or_path={base}."
        )
    final = RunFolder(folder).final
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        raise UserError(
            f"model.name_or_path: cannot load '{name}': it is a training output_dir; its model is "
            f"'{final}' (to evaluate, run_dir={name} takes the model and prompt from it)."
        )
    what = "is empty" if not any(folder.iterdir()) else "has no config.json"
    fix = (
        smoke_hint
        or "give the folder save_pretrained wrote (config.json and weights), or a hub id."
    )
    raise UserError(
        f"model.name_or_path: cannot load '{name}': the folder {what}, so it holds no model; {fix}"
    )


def load_model_config(name: str) -> Any:
    check_model_folder(name)
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as error:  # OSError, ValueError, EnvironmentError from the hub client
        raise _explain_load_error(name, error) from None


def load_tokenizer(name: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:
        raise _explain_load_error(name, error) from None
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers often lack one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def supports_zero3_init(model_config: Any) -> bool:
    """Whether loading under DeepSpeed zero.Init gives the same model as a normal load.

    Not for T5: transformers 5 always declares T5's head tied to the input embeddings and
    unties it at load time only when the checkpoint's two tensors differ (FLAN-T5's do).
    Under zero.Init the parameters are partitioned and that check cannot happen, so the head
    silently becomes the embedding matrix (seen here: initial loss 39.6 instead of 7.7).
    Such models are loaded whole on each rank's CPU and partitioned by deepspeed.initialize.
    """
    return model_config.model_type not in T5_FAMILY


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load normally even though a ZeRO-3 HfDeepSpeedConfig is alive (accelerate's plugin
    keeps one, and transformers then uses zero.Init in from_pretrained); restore it after,
    since ZeRO-3 generation and saving consult it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    live = reference() if reference is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_deepspeed.set_hf_deepspeed_config(live)


def check_attention_kernel(kernel: str) -> None:
    """model.attn_implementation=flash_attention_*: the package and a GPU, before any compute
    (transformers says so only while loading the weights)."""
    if not kernel.startswith("flash_attention"):
        return
    import importlib.util

    package = "flash_attn_interface" if kernel.endswith("_3") else "flash_attn"
    if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
        raise UserError(
            f"model.attn_implementation={kernel} needs a CUDA GPU and the {package} package "
            "(pip install flash-attn --no-build-isolation); leave it empty for sdpa."
        )


def model_kind(model_config: Any) -> str:
    return "seq2seq" if getattr(model_config, "is_encoder_decoder", False) else "causal"


def resolve_dtype(requested: str, model_config: Any) -> str:
    """Pick bf16/fp32 for `auto`; refuse fp16 for T5, whose activations overflow it."""
    if requested == "fp16" and model_config.model_type in T5_FAMILY:
        raise UserError(
            f"model.dtype=fp16 with a {model_config.model_type} model: T5 was trained in bfloat16 and its "
            "activations overflow fp16 (NaN loss, transformers #14189); use model.dtype=bf16 or fp32."
        )
    if requested == "auto":
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if has_bf16 else "fp32"
    if requested in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(
            f"model.dtype={requested} needs a GPU; this machine has none, use fp32 or auto."
        )
    return requested


def override_dropout(model_config: Any, dropout: float | None) -> list[str]:
    """Set every dropout probability in the config (T5 dropout_rate, BART dropout, GPT *_pdrop)."""
    if dropout is None:
        return []
    changed = []
    for key, value in model_config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(model_config, key, dropout)
            changed.append(key)
    return changed


def build_model(
    cfg: ModelConfig, peft_cfg: PeftConfig, model_config: Any, vocab_size: int | None = None
) -> Any:
    """Load weights in fp32 (master weights); bf16 compute comes from accelerate/DeepSpeed.
    vocab_size: the tokenizer's, when tokens were added to it (a built-in chat template's
    markers); the embeddings grow to it (transformers initialises new rows at the mean)."""
    override_dropout(model_config, cfg.dropout)
    auto_class = (
        AutoModelForSeq2SeqLM if model_kind(model_config) == "seq2seq" else AutoModelForCausalLM
    )
    loading = (
        contextlib.nullcontext() if supports_zero3_init(model_config) else zero3_init_disabled()
    )
    try:
        with loading:
            kernel = getattr(cfg, "attn_implementation", "")  # evaluation's config has none
            model = auto_class.from_pretrained(
                cfg.name_or_path,
                config=model_config,
                dtype=torch.float32,
                **({"attn_implementation": kernel} if kernel else {}),
            )
    except Exception as error:
        raise _explain_load_error(cfg.name_or_path, error) from None
    embeddings = model.get_input_embeddings().weight  # ZeRO-3: partitioned, ds_shape is real
    if vocab_size and vocab_size > getattr(embeddings, "ds_shape", embeddings.shape)[0]:
        model.resize_token_embeddings(vocab_size)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg.method == "lora":  # the other choice, "none", trains the whole model
        model = apply_lora(model, peft_cfg, model_config)
    return model


def apply_lora(model: Any, peft_cfg: PeftConfig, model_config: Any) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(peft_cfg.target_modules) or (
        ["q", "v"] if model_config.model_type in T5_FAMILY else None
    )
    task = TaskType.SEQ_2_SEQ_LM if model_kind(model_config) == "seq2seq" else TaskType.CAUSAL_LM
    lora = LoraConfig(
        task_type=task,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise UserError(f"peft.target_modules: {str(error).splitlines()[0]}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total). Under ZeRO-3 a partitioned parameter has shape [0]; ds_numel is
    its real size, so the counts are right whether or not the model is partitioned."""
    trainable = total = 0
    for parameter in model.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())
        total += numel
        if parameter.requires_grad:
            trainable += numel
    return trainable, total


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
