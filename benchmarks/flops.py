"""Model FLOPs of a training step, and the dense bf16 peaks MFU is measured against."""

from __future__ import annotations

from typing import Any

import numpy as np

# Dense (no sparsity) bf16 tensor-core peak per card, TFLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() by the first key it contains (longest first,
# so "H100 PCIe" wins over "H100"). MFU = model FLOPs per second / this.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16: V100 has no bf16
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a device the table does not know (or a CPU)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def t5_train_flops(config: Any, source_lengths: np.ndarray, target_lengths: np.ndarray) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) of a T5.

    Per example with S source and T target tokens, d = d_model, a = num_heads x d_kv,
    f = d_ff, V = vocab, Le / Ld encoder / decoder layers, 2 FLOPs per multiply-add:
      encoder, per layer:  S x (8 d a            q, k, v, o projections
                                + 6 d f          gated FFN: wi_0, wi_1, wo (4 d f if not gated)
                                + 4 S a)         scores QK^T and weights x V over S keys
      decoder, per layer:  T x (8 d a + 6 d f + 4 T a)   self-attention (full T x T: the causal
                                                        mask does not skip work in SDPA/eager)
                         + T x (4 d a + 4 S a)          cross-attention q, o and scores over S
                         + S x 4 d a                    cross-attention k, v of the encoder
                                                        output, per decoder layer
      head:                T x 2 d V
    Encoder weights see source tokens and decoder weights target tokens, so 6 x params x
    tokens over-counts the encoder (T << S on DialogSum) and misses attention. Layer norms,
    softmax, relative position bias and the loss are left out (not matmuls)."""
    d, a = config.d_model, config.num_heads * config.d_kv
    ffn = (6 if config.is_gated_act else 4) * config.d_model * config.d_ff
    S, T = (np.asarray(x, dtype=np.float64) for x in (source_lengths, target_lengths))
    encoder = config.num_layers * S * (8 * d * a + ffn + 4 * S * a)
    decoder = config.num_decoder_layers * (
        T * (8 * d * a + ffn + 4 * T * a) + T * (4 * d * a + 4 * S * a) + S * 4 * d * a
    )
    head = T * 2 * d * config.vocab_size
    return float(3 * (encoder + decoder + head).sum())


def lora_train_flops(full_flops: float) -> float:
    """LoRA skips the weight gradients of the frozen matmuls (a third of their training FLOPs)
    but still back-propagates through them: ~2 x forward instead of 3 x. The adapters' own
    FLOPs (r << d) are left out."""
    return full_flops * 2 / 3
