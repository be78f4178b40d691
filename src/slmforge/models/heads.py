"""The output head as a value objectives can use without knowing the family.

A language-model head ends in `features @ weight.T + bias`, optionally soft-capped. Families differ in
what comes before (a decoder uses its final hidden state as is; BERT-style encoders first apply a
dense + GELU + LayerNorm transform) and in whether `weight` is the embedding matrix. Each family's
`output_projection(hidden)` returns this object, so a loss can run the vocabulary product in chunks
(never holding tokens x vocabulary logits) and on a subset of positions only (masked LM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class OutputProjection:
    features: torch.Tensor
    """(..., d): what the vocabulary matrix multiplies."""
    weight: torch.Tensor
    """(V, d): the output embedding (the input embedding when tied)."""
    bias: torch.Tensor | None = None
    """(V,) or None."""
    softcap: float | None = None
    """If set, logits become cap * tanh(logits / cap) (Gemma 2 style)."""

    def logits(self) -> torch.Tensor:
        logits = F.linear(self.features, self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
