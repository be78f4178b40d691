"""Sequence-to-sequence training of encoder-decoders on (source, target) pairs: translation.

The source goes to the encoder, the target to the decoder behind the start token (teacher forcing,
`model.shift_right`), and every target token carries loss: the encoder-decoder branch of span
corruption with the spans replaced by a whole target sentence. Nothing is random, so collation needs
no per-sample generator.

    raw batch   {"tokens": (B, S) source ids + eos, padded; "attention_mask": (B, S) 1 = token;
                 "target_tokens": (B, T) target ids + eos, padded with -100; "sample_ids": (B,)}
    batch       {"input_ids", "attention_mask", "targets", "target_index", "real_tokens"}
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks
from slmforge.objectives.losses import HeadLoss


class Seq2Seq(TrainingHooks):
    """Source -> encoder, target -> decoder; loss on every target token (pairs made by the caller)."""

    name = "seq2seq"
    kinds = ("encoder-decoder",)
    head_loss = HeadLoss()  # the trainer sets train.loss_kernel / loss_chunk_rows
    metric_names = ("accuracy",)
    bits_per_byte = False

    def window_tokens(self, seq_len: int) -> int:
        """Pairs come whole from their own loader; a side holds at most seq_len tokens."""
        return seq_len

    def collate(self, raw: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        targets = raw["target_tokens"].long()
        mask = raw["attention_mask"].long() if "attention_mask" in raw else torch.ones_like(raw["tokens"])
        return {"input_ids": raw["tokens"].long(), "attention_mask": mask, "targets": targets,
                # Rows with a target, found on the host: the head runs on real target positions only.
                "target_index": (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1),
                # Tokens seen: the real source tokens, as span corruption counts its encoder input.
                "real_tokens": mask.sum()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = batch["targets"]
        # Padded target positions read the start token (shift_right) and sit after every real one, so
        # the causal decoder lets them see nothing they could change; their outputs are dropped below.
        hidden = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=model.shift_right(targets))
        index = batch["target_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        targets = targets.reshape(-1).index_select(0, index)
        loss, correct = self.head_loss(model.output_projection(hidden), targets)
        return loss, {"accuracy": correct / (targets != IGNORE_INDEX).sum().clamp(min=1)}
