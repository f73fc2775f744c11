"""The start-up check that packed rows keep attention inside each example.

transformers isolates the examples of a packed row (position ids restarting at 0, no
attention mask) for sdpa, eager and flex attention through masking_utils, and for
flash-attention through varlen kernels; other implementations, remote code or a model whose
forward builds its own mask may not. Rather than trust a list, the run checks the model it
built: the logits of example b packed behind example a must not change when a does. With
attention kept inside b they are equal up to rounding (a masked score adds exactly 0); with
attention crossing the boundary they move by orders of magnitude more.
"""

from __future__ import annotations

from typing import Any

import torch

from clustertune.errors import UserError

PROBE_TOKENS = 8  # per example: two examples packed in one row of 16
TOLERANCE = 1e-3  # relative to the largest logit; rounding is ~1e-7 (fp32) to ~1e-2 (bf16) of it


@torch.no_grad()
def packed_logit_change(model: Any, vocab_size: int, device: Any) -> float:
    """max |logits of b after a - logits of b after a'| / max |logits|, for random a, a', b.
    Collective under ZeRO-3 (a forward gathers parameters): every rank calls it."""
    generator = torch.Generator().manual_seed(0)

    def tokens() -> torch.Tensor:
        return torch.randint(3, vocab_size, (PROBE_TOKENS,), generator=generator)

    first, other_first, second = tokens(), tokens(), tokens()
    positions = torch.arange(PROBE_TOKENS).repeat(2)[None].to(device)
    was_training = model.training
    model.eval()  # no dropout
    logits = []
    for before in (first, other_first):
        row = torch.cat([before, second])[None].to(device)
        out = model(input_ids=row, position_ids=positions, use_cache=False).logits
        logits.append(out[0, PROBE_TOKENS:].float())
    model.train(was_training)
    scale = float(logits[0].abs().max().clamp_min(1e-6))
    return float((logits[0] - logits[1]).abs().max()) / scale


def check_packing_isolates(model: Any, vocab_size: int, accelerator: Any) -> str:
    """Refuse data.packing when attention crosses example boundaries; else the log line."""
    config = getattr(accelerator.unwrap_model(model), "config", None)
    attention = str(getattr(config, "_attn_implementation", None) or "default")
    change = packed_logit_change(model, vocab_size, accelerator.device)
    if change > TOLERANCE:
        raise UserError(
            f"data.packing: with attn_implementation={attention!r} attention crosses the "
            f"boundaries of packed examples (an example's logits change by {change:.2g} of "
            "their scale when the example before it changes); load the model with sdpa, eager "
            "or flash_attention_2, or set data.packing=false."
        )
    return (
        f"packing: attention stays inside each example ({attention}; an example's logits move "
        f"{change:.1g} of their scale when the example before it changes)"
    )
