"""What every objective provides, and what the trainer and evaluation do with it.

An objective owns its batch: the loader hands it raw token windows and it makes the model inputs and
targets itself (causal shift, masking, later span corruption). Its randomness comes from one generator
per sample, seeded by (seed, sample id): what a window sees depends on nothing else, so a resumed run,
a run on another number of processes and one with another micro-batch split all draw the same masks.

    raw batch    {"tokens": (B, W) int64, "sample_ids": (B,) int64 (unique per epoch and window),
                  "scored": (B, W) bool (optional: positions that count),
                  "attention_mask": (B, W) (optional: 1 = token, 0 = padding),
                  "document_ids": (B, W) (optional: packed examples, attention stays inside each)}
    batch        objective.collate(raw, seed) -> {"input_ids", "targets", ...}
    loss         objective.loss(model, batch) -> (mean loss over targets, {metric: mean over targets})
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Iterable, Protocol

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100
EVAL_SEED = 0
"""Masking seed of every evaluation (validation during training, `slmforge eval`): the same masks for
every run, so masked-LM figures compare across runs and checkpoints."""


class Objective(Protocol):
    """Everything the trainer, evaluation and the parallel wrappers call on an objective. The hooks
    below `loss` have defaults in `TrainingHooks`, which every objective inherits."""

    name: str
    kinds: tuple[str, ...]
    """Model kinds it can train ("decoder", "encoder"); the registry says which kind a family is."""
    metric_names: tuple[str, ...]
    bits_per_byte: bool
    """Whether its loss is a code length of the text (next-token prediction), so bits per byte apply."""

    def window_tokens(self, seq_len: int) -> int: ...

    def collate(self, raw: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    @property
    def eval_metric_names(self) -> tuple[str, ...]: ...

    def use_head_loss(self, head_loss) -> None: ...

    def set_progress(self, step: int, max_steps: int) -> None: ...

    def trainable_module(self) -> nn.Module | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict | None) -> None: ...


class TrainingHooks:
    """The defaults of the objective hooks the trainer calls (see `Objective`)."""

    @property
    def eval_metric_names(self) -> tuple[str, ...]:
        """The metrics evaluation reports; fewer than training's where validation measures less
        (distillation: the student alone)."""
        return self.metric_names

    def use_head_loss(self, head_loss) -> None:
        """How the output layer and its cross-entropy run (`train.loss_kernel`, `loss_chunk_rows`): a
        training choice, given by the trainer; objectives that compute no such loss ignore it."""
        self.head_loss = head_loss

    def set_progress(self, step: int, max_steps: int) -> None:
        """Where training is, for objectives whose weights follow a schedule (distillation)."""

    def trainable_module(self) -> nn.Module | None:
        """Parameters trained beside the model (distillation's projection), or None."""
        return None

    def state_dict(self) -> dict:
        """What the objective carries from step to step (tensors and plain values), saved in the
        checkpoint's trainer state; most objectives carry nothing (distillation: its control's twin)."""
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """A resume: what `state_dict` gave (None: the checkpoint holds none)."""


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    """A CPU generator that depends on nothing but (seed, sample id)."""
    state = np.random.SeedSequence([seed, int(sample_id)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_ids(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's sample ids; row numbers for hand-made batches that carry none."""
    if "sample_ids" in raw:
        return raw["sample_ids"]
    return torch.arange(raw["tokens"].shape[0])


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a collated batch that are text, not padding: what `tokens seen` counts (an
    objective that pads says how many in "real_tokens")."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"])
    return batch["input_ids"].numel()


@torch.no_grad()
def mean_loss(model: nn.Module, objective: Objective, raw_batches: Iterable[dict[str, torch.Tensor]],
              device: torch.device, autocast: AbstractContextManager | None = None, seed: int = EVAL_SEED,
              loss_fn=None) -> tuple[dict[str, float], int]:
    """Target-weighted means of the loss and the objective's metrics over `raw_batches`, and the number
    of targets. Samples are collated with a fixed seed, so masking is the same every time and across
    runs: figures stay comparable. `loss_fn(batch)` replaces `objective.loss(model, batch)` when the
    model is wrapped for several processes (the wrapper's forward gathers sharded weights)."""
    was_training = model.training
    model.eval()
    names = objective.eval_metric_names
    totals = {"loss": 0.0, **{name: 0.0 for name in names}}
    tokens = 0
    try:
        for raw in raw_batches:
            batch = objective.collate(raw, seed)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            count = target_tokens(batch)
            if count == 0 and loss_fn is None:
                continue
            # A wrapped model runs every batch, even one without targets: the other ranks' forward
            # passes wait for this one's collectives.
            with autocast or nullcontext():
                loss, metrics = loss_fn(batch) if loss_fn is not None else objective.loss(model, batch)
            if count == 0:
                continue
            totals["loss"] += float(loss) * count
            for name, value in metrics.items():
                totals[name] += float(value) * count
            tokens += count
    finally:
        model.train(was_training)
    means = {name: (total / tokens if tokens else float("nan")) for name, total in totals.items()}
    return means, tokens


def summarize(means: dict[str, float], bytes_per_token: float | None) -> dict[str, float]:
    """{"loss", ...metrics} (nats/token) -> adds "ppl", and "bpb" when the byte count is known.

    Bits per byte (total nats / ln 2 / total UTF-8 bytes) does not depend on the tokenizer, so it
    compares models with different vocabularies; perplexity per token does not. Perplexity of a masked
    LM is exp of the masked-token loss, as seed 001 (and BERT papers) report it."""
    loss = means["loss"]
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["bpb"] = loss / math.log(2) / bytes_per_token
    out.update({k: v for k, v in means.items() if k != "loss"})
    return out
