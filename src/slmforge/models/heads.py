"""The output head as a value objectives can use without knowing the family.

A language-model head ends in `features @ weight.T + bias`, optionally soft-capped. Families differ in
what comes before (a decoder uses its final hidden state as is; BERT-style encoders first apply a
dense + GELU + LayerNorm transform) and in whether `weight` is the embedding matrix. Each family's
`output_projection(hidden)` returns this object, so a loss can run the vocabulary product in chunks
(never holding tokens x vocabulary logits) and on a subset of positions only (masked LM).

Encoders fine-tuned for a task carry a `ClassifierHead` instead of the masked-LM head: labels per text
(classify) or per token (tag), laid out as transformers' *ForSequenceClassification and
*ForTokenClassification models are, so that export and import map it one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


# ---------------------------------------------------------------- classification heads

ENCODER_HEADS = ("mlm", "classify", "tag")
"""What sits on an encoder: the masked-LM head, one label per text (pooled), one label per token."""


class ClassifierHead(nn.Module):
    """Task logits from hidden states, in the shape transformers' classification models use:

        bert / roberta, classify   dense -> tanh -> out        (BERT's pooler + classifier; RoBERTa's
                                                                classifier.dense / out_proj)
        bert / roberta, tag        out                         (one linear layer per token)
        modernbert, both           dense -> GELU -> norm -> out  (ModernBertPredictionHead + classifier)

    Dropout (the encoder's rate) comes before `out`, as in transformers; `pool` picks the positions:
    the first token ([CLS] / <s>) or the mean of the real tokens for `classify`, every token for `tag`."""

    def __init__(self, hidden_size: int, num_labels: int, *, transform: str | None, bias: bool,
                 norm_eps: float, dropout: float, pooling: str | None = None):
        super().__init__()
        self.transform = transform
        self.pooling = pooling
        self.dense = nn.Linear(hidden_size, hidden_size, bias=bias) if transform else None
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps, bias=bias) if transform == "gelu_norm" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, d) -> (B, d) for classification; unchanged (B, T, d) for tagging."""
        if self.pooling is None:
            return hidden
        if self.pooling == "mean":
            if attention_mask is None:
                return hidden.mean(dim=1)
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return hidden[:, 0]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pool(hidden, attention_mask)
        if self.transform == "tanh":
            x = torch.tanh(self.dense(self.dropout(x)))
        elif self.transform == "gelu_norm":
            x = self.norm(F.gelu(self.dense(x)))
        return self.out(self.dropout(x))
