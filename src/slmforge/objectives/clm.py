"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
from torch import nn

from slmforge.objectives.losses import linear_cross_entropy


class CausalLM:
    """batch {"input_ids": (B, T), "targets": (B, T)} -> mean next-token cross-entropy.

    Targets equal to -100 (e.g. prompt tokens in fine-tuning) carry no loss.
    """

    name = "clm"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model.hidden_states(batch["input_ids"])
        loss = linear_cross_entropy(hidden, model.output_weight, batch["targets"],
                                    softcap=model.cfg.final_logit_softcap)
        return loss, {}

    @staticmethod
    def target_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != -100).sum())
