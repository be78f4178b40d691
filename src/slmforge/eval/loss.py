"""Held-out loss, perplexity and bits per byte.

Bits per byte (total nats / ln 2 / total UTF-8 bytes) does not depend on the tokenizer, so it compares
models with different vocabularies; perplexity per token does not. Every report shows both.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def mean_loss(model: nn.Module, objective, batches: Iterable[dict[str, torch.Tensor]],
              device: torch.device, autocast: AbstractContextManager | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over `batches` and the number of target tokens it covers."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            count = objective.target_tokens(batch)
            if count == 0:
                continue
            with autocast or nullcontext():
                loss, _ = objective.loss(model, batch)
            total += float(loss) * count
            tokens += count
    finally:
        model.train(was_training)
    return (total / tokens if tokens else float("nan")), tokens


def summarize(loss: float, bytes_per_token: float | None) -> dict[str, float]:
    """loss (nats/token) -> {"loss", "ppl", "bpb"}; bpb only when the byte count is known."""
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["bpb"] = loss / math.log(2) / bytes_per_token
    return out
