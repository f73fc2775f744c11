"""Library warnings that are known to be harmless here, silenced at their source.

Imported first by the recipes' entry points and by clustertune-launch's launcher process, so
the filters are in place before transformers, peft or DeepSpeed are imported. Each filter
matches one message of one library, with a comment saying why it is harmless; everything
else (a real mismatch between a config and a checkpoint, a deprecation in our own code, a
GPU that DeepSpeed could not find) still reaches the user. Config fixes come first: the
smoke T5 saves `tie_word_embeddings=false` (clustertune.smoke.assets).

    import clustertune.quiet  # noqa: F401  (first import of an entry point)
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

# transformers 5 forces `T5Config.tie_word_embeddings=True` on load (T5 v1.1, FLAN-T5, mT5
# and the smoke T5 all say `false`), then finds the checkpoint's own lm_head, keeps it as
# saved and logs this: the loaded model is exactly the checkpoint. Matched on T5's top-level
# parameter names only, so the same warning for any other model (a config that really
# disagrees with its checkpoint) is still shown.
T5_UNTIED_HEAD = (
    "The tied weights mapping and config for this model specifies to tie shared.weight to "
    "lm_head.weight, but both are present in the checkpoints with different values"
)

# DeepSpeed's auto-detection found no accelerator and chose the CPU. On a machine without
# one that is simply the truth (CPU tests, `make smoke`). Where one of these device nodes
# exists, CPU means detection failed and the warning is the hint, so it is kept there.
DEEPSPEED_CPU_FALLBACK = "Setting accelerator to CPU."
ACCELERATOR_DEVICE_NODES = (
    "/dev/nvidiactl",  # NVIDIA
    "/dev/kfd",  # AMD ROCm
    "/dev/dxg",  # GPU under WSL
    "/dev/accel",  # Linux compute accelerators (Gaudi, NPUs)
    "/dev/davinci_manager",  # Ascend
    "/dev/neuron0",  # AWS Neuron
)

# (message regex, category, module regex) for `warnings.filterwarnings`.
HARMLESS_WARNINGS = (
    # peft asks `model.is_gradient_checkpointing`, an alias transformers 5 deprecates in favour
    # of `is_activation_checkpointing`; the answer is the same. peft's to update, not the user.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # DeepSpeed ZeRO calls `torch.distributed.all_gather_into_tensor`, deprecated in torch 2.13
    # in favour of `all_gather_single`; it still gathers the same tensors.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, r"torch\."),
    # peft's merge_and_unload sees `tie_word_embeddings=True` (T5 under transformers 5, see
    # T5_UNTIED_HEAD) with a head of its own, and reports that it has set the flag to False:
    # a correction already made to match the weights, nothing left to do.
    (
        r"Input and output embeddings are no longer tied after merging",
        UserWarning,
        r"peft\.",
    ),
    # FSDP2 warns that T5Block returns a view tensor, on which an in-place op would skip the
    # pre-backward hook. T5's stack uses the block output out of place: the FSDP2 test
    # (tests/test_fsdp2.py) trains T5 on 2 ranks with the same losses as one process.
    (
        r"FSDP2-wrapped module \(FSDPT5Block\) returned a view tensor",
        UserWarning,
        r"torch\.distributed\.fsdp",
    ),
)


class DropMessages(logging.Filter):
    """Drop the records of one logger whose message starts with `prefix`, while `harmless()`."""

    def __init__(self, prefix: str, harmless: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.prefix = prefix
        self.harmless = harmless

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith(self.prefix) and self.harmless())


def has_accelerator_device() -> bool:
    return any(os.path.exists(node) for node in ACCELERATOR_DEVICE_NODES)


def no_accelerator_device() -> bool:
    return not has_accelerator_device()


def install() -> None:
    """Install the filters (idempotent). Logger filters survive `warnings` resets; warnings
    filters are re-added, so tests that reset them can call this again."""
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # A logger filter sees only records logged on that very logger: these are the loggers
    # that emit them (transformers' `logging.get_logger(__name__)`, DeepSpeed's "DeepSpeed").
    _add_once("transformers.modeling_utils", DropMessages(T5_UNTIED_HEAD))
    _add_once("DeepSpeed", DropMessages(DEEPSPEED_CPU_FALLBACK, no_accelerator_device))


def _add_once(logger_name: str, new: DropMessages) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) and f.prefix == new.prefix for f in logger.filters):
        logger.addFilter(new)


install()
