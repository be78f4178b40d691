"""Masked language modelling (BERT): hide some tokens, predict them from both sides.

Dynamic masking: every sample draws its own mask from a generator seeded by (seed, sample id), and
sample ids differ between epochs, so two epochs over the same window see different masks while a
resumed run, or one on another number of processes, masks exactly as an uninterrupted one. The loss is computed only at masked positions, and
the head runs only there too (gathered before it: ~6x less head compute at 15%).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.models.heads import OutputProjection
from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks, sample_generator, sample_ids
from slmforge.objectives.losses import HeadLoss

# Markers that begin a word in the vocabularies slmforge trains or imports: SentencePiece's "▁",
# byte-level BPE's "Ġ"; WordPiece marks the opposite (continuations start with "##").
_WORD_START_MARKERS = ("\u2581", "\u0120")


@dataclass
class MlmConfig:
    TAG: ClassVar[str] = "kind"

    kind: Literal["mlm"] = "mlm"
    """mlm: masked language modelling (encoders)."""
    mask_rate: float = 0.15
    """Share of tokens chosen for prediction (BERT 0.15, ModernBERT 0.30)."""
    mask_token_share: float = 0.8
    """Of the chosen tokens, this share becomes the mask token..."""
    random_token_share: float = 0.1
    """...this share a random (non-special) token, and the rest stays as it was (BERT's 80/10/10)."""
    whole_word: bool = False
    """Choose whole words, not single tokens: a word's pieces (a Devanagari or Bengali word with its
    matras, signs and virama included) are masked together."""
    z_loss: float = 0.0
    """Weight of PaLM's auxiliary z-loss: z_loss * log(Z)^2 per scored token (Z the softmax normaliser)
    joins the training loss, pulling log Z toward 0 (PaLM used 1e-4, for stability of large bf16 runs).
    Training only: validation reports the plain cross-entropy; the training metrics show the term as
    "z_loss". 0 (off) by default: measured in docs/pretraining.md ("z-loss"), it did not win on our shapes."""

    def validate(self) -> None:
        require(0 < self.mask_rate < 1, "mask_rate", f"must be in (0, 1), got {self.mask_rate}")
        require(0 <= self.mask_token_share <= 1, "mask_token_share", "must be in [0, 1]")
        require(0 <= self.random_token_share and self.mask_token_share + self.random_token_share <= 1 + 1e-9,
                "random_token_share", f"must be in [0, 1 - mask_token_share], got {self.random_token_share}")
        require(self.z_loss >= 0, "z_loss", f"must be >= 0 (PaLM used 1e-4), got {self.z_loss}")


def word_start_table(tokenizer) -> torch.Tensor:
    """(V,) bool: whether each token id begins a word (specials count as boundaries).

    A token starting with a combining mark (a matra, virama, nukta, anusvara...) never begins a word,
    whatever its marker says: it belongs to the letter before it."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    starts = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    wordpiece = any(t.startswith("##") for t in vocab)
    markers = any(t.startswith(_WORD_START_MARKERS) for t in vocab)
    for token, index in vocab.items():
        if index in tokenizer.special_ids:
            starts[index] = True
            continue
        if wordpiece:
            begins = not token.startswith("##")
        elif markers:
            begins = token.startswith(_WORD_START_MARKERS)
        else:  # no markers: pre-tokenized words, every token its own word
            begins = True
        body = token.lstrip("".join(_WORD_START_MARKERS)).removeprefix("##")
        if body and unicodedata.category(body[0]).startswith("M"):
            begins = False
        starts[index] = begins
    return starts


class MaskedLM(TrainingHooks):
    name = "mlm"
    kinds = ("encoder",)
    head_loss = HeadLoss()  # the trainer sets train.loss_kernel / loss_chunk_rows
    metric_names = ("accuracy",)
    bits_per_byte = False

    def __init__(self, cfg: MlmConfig, *, mask_id: int, vocab_size: int, special_ids: set[int],
                 word_starts: torch.Tensor | None = None):
        self.cfg = cfg
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[sorted(i for i in special_ids if i < vocab_size)] = True
        # random replacements are drawn from ordinary tokens only: a random [SEP] or <pad> teaches nothing
        self.ordinary = (~self.special).nonzero()[:, 0]
        self.word_starts = word_starts

    @classmethod
    def for_tokenizer(cls, cfg: MlmConfig, tokenizer, where: str = "tokenizer") -> "MaskedLM":
        if tokenizer is None:
            raise SlmforgeError(f"objective.kind: 'mlm' needs the tokenizer's mask token, and {where} "
                                f"names no tokenizer")
        if tokenizer.mask_id is None:
            raise SlmforgeError(f"{where}: the tokenizer has no mask token; train one with "
                                f"tokenizer.mask = \"[MASK]\" (the default <mask> works too) or import one that has it")
        starts = word_start_table(tokenizer) if cfg.whole_word else None
        return cls(cfg, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                   special_ids=set(tokenizer.special_ids), word_starts=starts)

    def window_tokens(self, seq_len: int) -> int:
        return seq_len

    # ------------------------------------------------------------ masking

    def draws(self, raw: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample, from its own generator: a choice draw and an action draw per position, and a
        random ordinary token per position. Each (B, T)."""
        choice, action, replacement = [], [], []
        length = raw["tokens"].shape[1]
        for sample in sample_ids(raw).tolist():
            generator = sample_generator(seed, sample)
            choice.append(torch.rand(length, generator=generator))
            action.append(torch.rand(length, generator=generator))
            replacement.append(torch.randint(len(self.ordinary), (length,), generator=generator))
        return torch.stack(choice), torch.stack(action), self.ordinary[torch.stack(replacement)]

    def choose(self, tokens: torch.Tensor, allowed: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions to predict, each allowed token (or word) with probability mask_rate."""
        if self.word_starts is None:
            return (draws < self.cfg.mask_rate) & allowed
        # Number the words of each row; a word is chosen when the draw at its first token is low.
        starts = self.word_starts[tokens] | ~allowed
        starts[:, 0] = True
        word = starts.long().cumsum(1) - 1  # (B, T): index of the word each token belongs to
        first_draw = torch.where(starts, draws, float("inf"))  # one finite value per word: its first token's
        per_word = torch.full_like(draws, float("inf")).scatter_reduce(1, word, first_draw, "amin")
        return (per_word.gather(1, word) < self.cfg.mask_rate) & allowed

    def collate(self, raw: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        tokens = raw["tokens"].long()
        allowed = ~self.special[tokens]  # never special or padding tokens
        if "scored" in raw:
            allowed &= raw["scored"].bool()
        choice, action, random_ids = self.draws(raw, seed)
        chosen = self.choose(tokens, allowed, choice)
        replace_mask = chosen & (action < self.cfg.mask_token_share)
        replace_random = chosen & ~replace_mask & (action < self.cfg.mask_token_share + self.cfg.random_token_share)
        inputs = torch.where(replace_mask, self.mask_id, tokens)
        inputs = torch.where(replace_random, random_ids, inputs)
        batch = {"input_ids": inputs, "targets": torch.where(chosen, tokens, IGNORE_INDEX)}
        if "attention_mask" in raw:
            batch["attention_mask"] = raw["attention_mask"]
        return batch

    # ------------------------------------------------------------ loss

    def predictions(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[OutputProjection, torch.Tensor]:
        """The head at the masked positions only ((N, d), N ~ 15% of B*T), and their targets."""
        hidden = model(batch["input_ids"], batch.get("attention_mask"))  # (B, T, d)
        targets = batch["targets"]
        where = targets != IGNORE_INDEX
        return model.output_projection(hidden[where]), targets[where]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        projection, targets = self.predictions(model, batch)
        z_loss = self.cfg.z_loss if model.training else 0.0  # a training-only term: validation is the cross-entropy
        loss, correct, z_term = self.head_loss.with_z_loss(projection, targets, z_loss)
        return loss, {"accuracy": correct / max(targets.numel(), 1), **({"z_loss": z_term} if z_loss else {})}
