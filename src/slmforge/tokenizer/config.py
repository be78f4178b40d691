"""`TokenizerConfig`: the `[tokenizer]` section of a run config (what to train, on what text)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slmforge import config
from slmforge.text.mixture import MixtureConfig

SECTION = "tokenizer"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "bytelevel", "unigram", "wordpiece"] = "bpe"
    """Model: 'bpe' (SentencePiece-style BPE with byte fallback, exact round trip), 'bytelevel'
    (GPT-2-style byte-level BPE, exact round trip), 'unigram' (SentencePiece-style unigram with byte
    fallback, exact round trip), 'wordpiece' (BERT-style; whitespace is not kept)."""
    vocab_size: int = 32000
    """Total number of ids, special tokens and the 256 byte tokens included."""
    min_frequency: int = 2
    """A merge must occur this often in the sample to be learned (bpe, bytelevel, wordpiece); with
    `akshara`, also an akshara to be learned whole (bpe, unigram)."""
    normalization: Literal["none", "nfc", "nfkc"] = "nfc"
    """Unicode normalization. 'nfc' is safe for every script (Devanagari, Bengali-Assamese, Latin).
    'nfkc' also folds compatibility characters (ligatures, full-width forms, superscripts,
    circled digits): that changes text and can damage some scripts; use it only on purpose."""
    lowercase: bool = False
    """Lowercase the text. Never strips combining marks (matras, virama, nukta, umlauts)."""
    split_digits: bool = True
    """Split numbers into single digits (as Llama and Gemma do), in every script's digits."""
    character_coverage: float = 0.9999
    """Keep the most frequent characters covering this share of the sample as tokens; rarer
    characters become byte tokens (bpe) or the unknown token (wordpiece). 1.0 keeps every
    character (SentencePiece's advice for small alphabets and small corpora); lower values stop
    stray symbols of web text from taking ids. Not used by unigram, which keeps every character
    it sees, nor by bytelevel, which starts from all 256 bytes."""
    max_token_chars: int = 16
    """Longest token in characters (keeps runs like '=====' from eating the vocabulary); with
    `akshara`, in aksharas."""
    akshara: bool = False
    """bpe and unigram: never split an akshara (a consonant with its vowel sign, nukta, anusvara,
    and conjuncts joined by a virama) across tokens, so no token starts with a vowel sign. Aksharas
    seen fewer than min_frequency times are not learned, and at most half of the learnable ids go
    to aksharas and their parts. The result is a plain tokenizer.json."""
    bos: str = "<bos>"
    """Beginning-of-sequence token ('' for none). `encode(..., add_special=True)` prepends it."""
    eos: str = "<eos>"
    """End-of-sequence token ('' for none)."""
    pad: str = "<pad>"
    """Padding token ('' for none)."""
    unk: str = "<unk>"
    """Unknown token ('' for none; required by unigram and wordpiece)."""
    mask: str = "<mask>"
    """Mask token for masked-LM training ('' for none)."""
    num_sentinels: int = 0
    """Number of sentinel tokens <extra_id_0>, <extra_id_1>, ... for T5-style span corruption."""
    inputs: list[str] = field(default_factory=list)
    """Training text: files or folders (text one sentence per line, .jsonl, .parquet; .gz/.zst
    compressed too). Leave empty when `mixture` is set."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet inputs."""
    mixture: MixtureConfig | None = None
    """Language mixture to sample the training sentences from, instead of `inputs`."""
    max_sentences: int = 300_000
    """Sentence budget: the trainer sees a uniform sample of at most this many lines, so a corpus
    far larger than memory trains in bounded memory."""
    max_chars: int = 4096
    """Longer lines are cut (at a space when possible): trainers overflow on huge 'sentences'."""
    seed: int = 0
    """Seed of the sentence sample."""

    def validate(self) -> None:
        config.require(self.vocab_size > 0, "vocab_size", f"must be positive, got {self.vocab_size}")
        config.require(self.min_frequency >= 1, "min_frequency", "must be at least 1")
        config.require(0.5 < self.character_coverage <= 1.0, "character_coverage",
                       f"must be in (0.5, 1], got {self.character_coverage}")
        config.require(self.max_token_chars >= 1, "max_token_chars", "must be at least 1")
        config.require(self.num_sentinels >= 0, "num_sentinels", "must be >= 0")
        config.require(self.max_sentences >= 1, "max_sentences", "must be at least 1")
        config.require(self.max_chars >= 16, "max_chars", "must be at least 16")
        for role, token in self.roles().items():
            config.require(token is None or (token.strip() == token and not BYTE_TOKEN.fullmatch(token)),
                           role, f"{token!r} is not a usable special token")
        config.require(not self.akshara or self.kind in ("bpe", "unigram"), "akshara",
                       f"is for kind 'bpe' or 'unigram', not {self.kind!r}")
        if self.kind in ("unigram", "wordpiece"):
            config.require(bool(self.unk), "unk", f"kind {self.kind!r} needs an unknown token")
        config.require(not (self.inputs and self.mixture is not None), "inputs",
                       "set either inputs or mixture, not both")
        floor = len(self.special_tokens()) + (0 if self.kind == "wordpiece" else 256)
        # bpe/unigram reserve 256 byte-fallback tokens, bytelevel starts from 256 byte symbols;
        # the rest is what is actually learned.
        config.require(self.vocab_size > floor, "vocab_size",
                       f"must exceed {floor} for kind {self.kind!r} "
                       f"({len(self.special_tokens())} special tokens"
                       f"{'' if self.kind == 'wordpiece' else ' + 256 byte tokens'}), "
                       f"got {self.vocab_size}")

    def roles(self) -> dict[str, str | None]:
        """Role -> token string (None where the role is switched off)."""
        return {"pad": self.pad or None, "bos": self.bos or None, "eos": self.eos or None,
                "unk": self.unk or None, "mask": self.mask or None}

    def sentinels(self) -> list[str]:
        return [f"<extra_id_{i}>" for i in range(self.num_sentinels)]

    def special_tokens(self) -> list[str]:
        """All special tokens in id order (they take the first ids): roles, then sentinels."""
        tokens = [t for t in self.roles().values() if t] + self.sentinels()
        return list(dict.fromkeys(tokens))  # bos == eos (GPT-2 style) is allowed: one id


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TokenizerConfig:
    """The `[tokenizer]` section of a recipe plus `tokenizer.field=value` overrides."""
    return config.load_section(TokenizerConfig, SECTION, path, overrides)
