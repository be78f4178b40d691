"""Span corruption (T5, Raffel et al. 2020, section 3.1.4): drop random spans of a window, mark each
gap with a sentinel, and predict the dropped spans behind their sentinels.

    window     the quick brown fox jumps over the lazy dog
    inputs     the quick <extra_id_0> jumps over <extra_id_1> dog </s>
    targets    <extra_id_0> brown fox <extra_id_1> the lazy </s>

As T5 defines it: round(length x noise_density) noise tokens in round(noise / mean_span_length) spans;
the noise and the kept tokens are each split into that many non-empty spans uniformly at random, and
the window alternates kept, noise, kept, noise, ... (starting with kept tokens). The window length is
chosen from the wanted encoder input length as T5's `random_spans_helper` does, so every input holds
exactly train.seq_len tokens and every target the same number: no padding anywhere.

Two forms, by the model trained:
- encoder-decoder: inputs to the encoder, targets to the decoder (teacher-forced behind the start
  token, `model.shift_right`); the loss is over every target token.
- decoder-only ("prefix" form): one sequence `inputs separator targets eos` of train.seq_len + 1 tokens
  (or up to two fewer, when a span's two sentinels make the lengths step past it; never padded);
  next-token loss on the target part only.

Every sample draws its spans from a generator seeded by (seed, sample id), as masked LM does: a resumed
run, or one on another number of processes, corrupts every window exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks, sample_generator, sample_ids
from slmforge.objectives.losses import HeadLoss


@dataclass
class SpanConfig:
    TAG: ClassVar[str] = "kind"

    kind: Literal["span"] = "span"
    """span: T5 span corruption (encoder-decoders; decoders in prefix form)."""
    noise_density: float = 0.15
    """Share of each window's tokens dropped and predicted (T5: 0.15)."""
    mean_span_length: float = 3.0
    """Average length of a dropped span (T5: 3)."""
    separator: str = ""
    """Decoder-only prefix form: the token between corrupted input and targets ('' = the eos token)."""

    def validate(self) -> None:
        require(0 < self.noise_density < 0.5, "noise_density", f"must be in (0, 0.5), got {self.noise_density}")
        require(self.mean_span_length >= 1, "mean_span_length", f"must be >= 1, got {self.mean_span_length}")


# ---------------------------------------------------------------- lengths


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens, rounded as T5 rounds them; at least
    one noise token, one kept token and one span."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(input length, target length) of a corrupted window: kept tokens + one sentinel per span + eos,
    and noise tokens + one sentinel per span + eos."""
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def window_for_inputs(inputs_length: int, noise_density: float, mean_span_length: float) -> int:
    """The longest window whose corrupted input fits in `inputs_length` tokens (T5's random_spans_helper).

    Adding one token to a window adds 0 or 1 input tokens (a kept token, or a noise token that may
    open a span), so the longest fitting window fills the input exactly: 512 -> 568 at 0.15 and 3."""
    length = max(inputs_length - 1, 2)
    while corrupted_lengths(length + 1, noise_density, mean_span_length)[0] <= inputs_length:
        length += 1
    return length


def window_for_prefix(seq_len: int, noise_density: float, mean_span_length: float) -> int:
    """Decoder-only form: the longest window whose `inputs separator targets eos` sequence fits in
    seq_len + 1 tokens (one more than the model sees: the last token is only a target)."""
    length = 2
    while _prefix_total(length + 1, noise_density, mean_span_length) <= seq_len + 1:
        length += 1
    if _prefix_total(length, noise_density, mean_span_length) > seq_len + 1:
        raise SlmforgeError(f"train.seq_len: {seq_len} is too short for span corruption")
    return length


def _prefix_total(length: int, noise_density: float, mean_span_length: float) -> int:
    _, spans = noise_counts(length, noise_density, mean_span_length)
    return length + 2 * spans + 2  # a sentinel per span on each side, the separator, eos


# ---------------------------------------------------------------- one window


def random_partition(total: int, parts: int, generator: torch.Generator) -> torch.Tensor:
    """`parts` positive lengths summing to `total`, uniformly over all such compositions: cut the
    total at parts - 1 distinct places among its total - 1 gaps."""
    cuts = torch.randperm(total - 1, generator=generator)[:parts - 1].sort().values + 1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])])
    return edges.diff()


def noise_mask(length: int, noise: int, spans: int, generator: torch.Generator) -> torch.Tensor:
    """(length,) bool, True = dropped: kept, noise, kept, noise, ... spans, starting with kept."""
    noise_lengths = random_partition(noise, spans, generator)
    kept_lengths = random_partition(length - noise, spans, generator)
    lengths = torch.stack([kept_lengths, noise_lengths], dim=1).reshape(-1)  # k0 n0 k1 n1 ...
    flags = torch.tensor([False, True]).repeat(spans)
    return flags.repeat_interleave(lengths)


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, sentinels: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, source positions of the targets) of one window, without eos. Each noise
    span becomes its sentinel in the inputs; in the targets each span follows its sentinel, whose
    source position is -1."""
    starts = mask & ~torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])  # first token of each span
    span = starts.long().cumsum(0) - 1  # span number at every position (meaningful where mask)
    inputs = torch.where(starts, sentinels[span.clamp(min=0)], tokens)[~mask | starts]
    positions = mask.nonzero()[:, 0]  # noise tokens, in order
    opens = starts[positions]
    slot = (1 + opens.long()).cumsum(0) - 1  # where each noise token lands: after its sentinel, if any
    targets = torch.empty(len(positions) + int(opens.sum()), dtype=torch.long)
    sources = torch.full_like(targets, -1)
    targets[slot], sources[slot] = tokens[positions], positions
    targets[slot[opens] - 1] = sentinels[span[positions[opens]]]
    return inputs, targets, sources


class SpanCorruption(TrainingHooks):
    """T5 span corruption; the form (encoder-decoder or decoder prefix) follows the model's kind."""

    name = "span"
    kinds = ("encoder-decoder", "decoder")
    head_loss = HeadLoss()  # the trainer sets train.loss_kernel / loss_chunk_rows
    metric_names = ("accuracy",)
    bits_per_byte = False

    def __init__(self, cfg: SpanConfig, *, sentinel_ids: list[int], eos_id: int, model_kind: str = "encoder-decoder",
                 separator_id: int | None = None):
        self.cfg = cfg
        self.sentinels = torch.tensor(sentinel_ids, dtype=torch.long)
        self.eos_id = eos_id
        self.prefix = model_kind == "decoder"
        self.separator_id = separator_id if separator_id is not None else eos_id

    @classmethod
    def for_tokenizer(cls, cfg: SpanConfig, tokenizer, model_kind: str, where: str = "tokenizer") -> "SpanCorruption":
        if tokenizer is None:
            raise SlmforgeError(f"objective.kind: 'span' needs the tokenizer's sentinel tokens, and {where} names "
                                f"no tokenizer")
        if not tokenizer.sentinel_ids:
            raise SlmforgeError(f"{where}: the tokenizer has no sentinel tokens <extra_id_0>, ...; train one with "
                                f"tokenizer.num_sentinels = 100 (T5's count) or import one that has them")
        if tokenizer.eos_id is None:
            raise SlmforgeError(f"{where}: the tokenizer has no eos token, which ends span-corruption inputs and "
                                f"targets; train one with tokenizer.eos set")
        separator = None
        if cfg.separator:
            separator = tokenizer.token_to_id(cfg.separator)
            if separator is None:
                raise SlmforgeError(f"objective.separator: {cfg.separator!r} is not a token of {where}")
        return cls(cfg, sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id, model_kind=model_kind,
                   separator_id=separator)

    # ------------------------------------------------------------ lengths

    def window_tokens(self, seq_len: int) -> int:
        """Raw tokens per sample: so that the encoder input (or the decoder's whole sequence) is full."""
        cfg = self.cfg
        if self.prefix:
            length = window_for_prefix(seq_len, cfg.noise_density, cfg.mean_span_length)
        else:
            length = window_for_inputs(seq_len, cfg.noise_density, cfg.mean_span_length)
        self._check_sentinels(length)
        return length

    def lengths(self, window: int) -> tuple[int, int]:
        """(input length, target length) for windows of `window` tokens (encoder-decoder form)."""
        return corrupted_lengths(window, self.cfg.noise_density, self.cfg.mean_span_length)

    def _check_sentinels(self, window: int) -> None:
        _, spans = noise_counts(window, self.cfg.noise_density, self.cfg.mean_span_length)
        if spans > len(self.sentinels):
            raise SlmforgeError(f"objective.kind: span corruption of {window}-token windows makes {spans} spans but "
                                f"the tokenizer has {len(self.sentinels)} sentinel tokens; train one with "
                                f"tokenizer.num_sentinels >= {spans} (T5 uses 100)")

    # ------------------------------------------------------------ batches

    def collate(self, raw: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        tokens = raw["tokens"].long()
        W = tokens.shape[1]
        self._check_sentinels(W)
        noise, spans = noise_counts(W, self.cfg.noise_density, self.cfg.mean_span_length)
        scored = raw["scored"].bool() if "scored" in raw else torch.ones_like(tokens, dtype=torch.bool)
        eos = torch.tensor([self.eos_id])
        rows_in, rows_out = [], []
        for row, sample in enumerate(sample_ids(raw).tolist()):
            mask = noise_mask(W, noise, spans, sample_generator(seed, sample))
            inputs, targets, sources = corrupt(tokens[row], mask, self.sentinels)
            # A dropped token counts if it is scored; sentinels and eos if anything in the window is
            # (the loader's filler windows past the end of a split score nothing).
            any_scored = bool(scored[row].any())
            counted = torch.cat([torch.where(sources >= 0, scored[row][sources.clamp(min=0)], any_scored),
                                 torch.tensor([any_scored])])
            targets = torch.cat([targets, eos])
            labels = torch.where(counted, targets, IGNORE_INDEX)
            if self.prefix:  # one sequence: inputs separator targets eos; predict the target part only
                rows_in.append(torch.cat([inputs, torch.tensor([self.separator_id]), targets]))
                rows_out.append(torch.cat([torch.full((len(inputs),), IGNORE_INDEX), labels]))
            else:
                rows_in.append(torch.cat([inputs, eos]))
                rows_out.append(labels)
        if self.prefix:
            sequences = torch.stack(rows_in)  # (B, W + 2 x spans + 2) <= seq_len + 1
            return {"input_ids": sequences[:, :-1], "targets": torch.stack(rows_out)}
        return {"input_ids": torch.stack(rows_in), "targets": torch.stack(rows_out)}

    # ------------------------------------------------------------ loss

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = batch["targets"]
        if self.prefix:
            hidden = model(batch["input_ids"])
        else:
            hidden = model(batch["input_ids"], batch.get("attention_mask"),
                           decoder_input_ids=model.shift_right(targets))
        loss, correct = self.head_loss(model.output_projection(hidden), targets)
        return loss, {"accuracy": correct / (targets != IGNORE_INDEX).sum().clamp(min=1)}
