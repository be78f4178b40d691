"""Text classification and word tagging for encoders fine-tuned with a classification head.

The raw batch (finetune/classify.py's `LabelLoader`) holds padded rows of token ids and, per row, a
label id (classify: the text's class) or a label id per token (tag: the class of the word a token
begins, -100 on every other token: a word's later pieces, [CLS], [SEP] and padding):

    raw      {"tokens": (B, T), "attention_mask": (B, T), "labels": (B,) or (B, T),
              "token_type_ids": (B, T) (pairs, models with token types), "sample_ids": (B,)}
    batch    {"input_ids", "attention_mask", "targets", "real_tokens", ("token_type_ids")}
    loss     cross-entropy over the targets (their mean), and the share predicted right

Nothing is drawn at random, so collating needs no seed; dropout is the model's (the trainer keeps its
random state with every checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks


class Classification(TrainingHooks):
    """A label per text (task "classify", the model's head pools the first token) or per word (task
    "tag", the head runs on every token and the targets sit on each word's first token)."""

    kinds = ("encoder",)
    metric_names = ("accuracy",)
    bits_per_byte = False

    def __init__(self, task: str):
        if task not in ("classify", "tag"):
            raise ValueError(f"task must be classify or tag, got {task!r}")
        self.task = task
        self.name = task

    def window_tokens(self, seq_len: int) -> int:
        return seq_len

    def collate(self, raw: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        tokens = raw["tokens"].long()
        mask = raw["attention_mask"].long() if "attention_mask" in raw else torch.ones_like(tokens)
        batch = {"input_ids": tokens, "attention_mask": mask, "targets": raw["labels"].long(),
                 "real_tokens": mask.sum()}
        if "token_type_ids" in raw:
            batch["token_type_ids"] = raw["token_type_ids"].long()
        return batch

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, labels) or (B, T, labels)."""
        hidden = model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch.get("token_type_ids"))
        return model.classify(hidden, batch["attention_mask"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, batch)
        targets = batch["targets"].reshape(-1)
        logits = logits.reshape(targets.shape[0], -1).float()
        scored = targets != IGNORE_INDEX
        count = scored.sum().clamp(min=1)
        # A sum over the targets divided by their count: a batch without targets gives 0, not nan.
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
        correct = ((logits.argmax(-1) == targets) & scored).sum()
        return loss, {"accuracy": correct / count}
