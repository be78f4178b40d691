"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.models.heads import OutputProjection
from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks
from slmforge.objectives.losses import HeadLoss


@dataclass
class ClmConfig:
    TAG: ClassVar[str] = "kind"

    kind: Literal["clm"] = "clm"
    """clm: next-token prediction (decoders)."""
    documents: bool = False
    """Keep documents apart inside a training window: attention and positions restart after every eos,
    as if each document were alone (and a document's first token is not predicted from the previous
    document). Off: a window is one stream of text, as GPT-2 and most pretraining runs treat it."""
    z_loss: float = 0.0
    """Weight of PaLM's auxiliary z-loss: z_loss * log(Z)^2 per scored token (Z the softmax normaliser)
    joins the training loss, pulling log Z toward 0 (PaLM used 1e-4, for stability of large bf16 runs).
    Training only: validation reports the plain cross-entropy; the training metrics show the term as
    "z_loss". 0 (off) by default: measured in docs/pretraining.md ("z-loss"), it did not win on our shapes."""

    def validate(self) -> None:
        require(self.z_loss >= 0, "z_loss", f"must be >= 0 (PaLM used 1e-4), got {self.z_loss}")


class CausalLM(TrainingHooks):
    """Windows of seq_len + 1 tokens -> inputs and next-token targets; loss on every scored target.

    Targets equal to -100 (e.g. prompt tokens in fine-tuning, a bos after eos) carry no loss.
    """

    name = "clm"
    kinds = ("decoder",)
    head_loss = HeadLoss()  # the trainer sets train.loss_kernel / loss_chunk_rows
    metric_names = ("accuracy",)
    bits_per_byte = True

    def __init__(self, cfg: ClmConfig | None = None, eos_id: int | None = None):
        self.cfg = cfg or ClmConfig()
        self.eos_id = eos_id

    @classmethod
    def for_tokenizer(cls, cfg: ClmConfig, tokenizer, where: str = "tokenizer") -> "CausalLM":
        if cfg.documents and (tokenizer is None or tokenizer.eos_id is None):
            raise SlmforgeError(f"objective.documents: needs the eos token that ends each document, and {where} "
                                f"names a tokenizer without one")
        return cls(cfg, tokenizer.eos_id if tokenizer is not None else None)

    def window_tokens(self, seq_len: int) -> int:
        return seq_len + 1

    def collate(self, raw: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        tokens = raw["tokens"].long()
        targets = tokens[:, 1:]
        if "scored" in raw:
            targets = torch.where(raw["scored"][:, 1:], targets, IGNORE_INDEX)
        batch = {"input_ids": tokens[:, :-1], "targets": targets}
        if self.cfg.documents and "document_ids" not in raw:
            ends = tokens == self.eos_id  # an eos belongs to the document it ends
            raw = {**raw, "document_ids": ends.long().cumsum(1) - ends.long()}
        if "attention_mask" in raw:
            batch["attention_mask"] = raw["attention_mask"][:, :-1]
        if "document_ids" in raw:  # packed examples: a document's first token is not predicted from another's
            documents = raw["document_ids"].long()
            batch["targets"] = torch.where(documents[:, 1:] == documents[:, :-1], batch["targets"], IGNORE_INDEX)
            batch["document_ids"] = documents[:, :-1]
        if "attention_mask" in raw or "document_ids" in raw:
            # Tokens seen: (input, next token) pairs of real tokens, whatever the padding width.
            real = raw["attention_mask"].bool() if "attention_mask" in raw else raw["document_ids"] >= 0
            batch["real_tokens"] = (real[:, 1:] & real[:, :-1]).sum()
        if "scored" in raw or "document_ids" in raw:
            # Rows with a target, found here on the host: the head and the loss then run on these rows
            # only (fine-tuning prompts carry no loss, and need no logits either).
            batch["target_index"] = (batch["targets"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        return batch

    def predictions(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[OutputProjection, torch.Tensor]:
        """The head at the positions with a target (all, or those of `target_index`), and the targets."""
        packed = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
        hidden = model(batch["input_ids"], batch.get("attention_mask"), **packed)
        targets = batch["targets"]
        if "target_index" in batch:
            index = batch["target_index"]
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
            targets = targets.reshape(-1).index_select(0, index)
        return model.output_projection(hidden), targets

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        projection, targets = self.predictions(model, batch)
        z_loss = self.cfg.z_loss if model.training else 0.0  # a training-only term: validation is the cross-entropy
        loss, correct, z_term = self.head_loss.with_z_loss(projection, targets, z_loss)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return loss, {"accuracy": correct / count, **({"z_loss": z_term} if z_loss else {})}
