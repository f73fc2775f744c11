"""Loss normalised by the target tokens of the whole global batch: split-invariant."""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM

from clustertune.data import Collator
from clustertune.optim import token_loss_sum


def examples(n=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        src = torch.randint(
            3, 200, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g
        ).tolist() + [1]
        tgt = torch.randint(3, 200, (2 + i * 3,), generator=g).tolist() + [
            1
        ]  # very different lengths
        out.append({"input_ids": src, "labels": tgt})
    return out


def gradient(model, micro_batches, denominator):
    model.zero_grad()
    collate = Collator(pad_token_id=0, decoder_start_token_id=0)
    for mb in micro_batches:
        (token_loss_sum(model, collate(mb), "seq2seq") / denominator).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_one_micro_batch_equals_four_accumulated(smoke_assets):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(smoke_assets["tiny_t5"], dropout_rate=0.0)
    batch = examples()
    tokens = sum(len(e["labels"]) for e in batch)
    whole = gradient(model, [batch], tokens)
    split = gradient(model, [batch[i : i + 2] for i in range(0, 8, 2)], tokens)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    # The common per-micro-batch mean (then averaged) weighs tokens unequally: it differs.
    collate = Collator(pad_token_id=0, decoder_start_token_id=0)
    model.zero_grad()
    for i in range(0, 8, 2):
        mb = batch[i : i + 2]
        (
            token_loss_sum(model, collate(mb), "seq2seq") / sum(len(e["labels"]) for e in mb) / 4
        ).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(naive, whole, rtol=1e-3)
