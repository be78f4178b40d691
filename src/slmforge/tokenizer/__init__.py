"""Tokenizers: train (bpe with byte fallback, byte-level bpe, unigram, wordpiece), import, compare.

    cfg = TokenizerConfig(vocab_size=8000, inputs=["corpus/"])
    train_tokenizer(cfg, "tok")
    tok = load_tokenizer("tok")
    ids = tok.encode("हिन्दी और অসমীয়া")
    assert tok.decode(ids) == "हिन्दी और অসমীয়া"
"""

from slmforge.tokenizer.config import TokenizerConfig, load_config
from slmforge.tokenizer.importing import import_tokenizer
from slmforge.tokenizer.report import tokenizer_report
from slmforge.tokenizer.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from slmforge.tokenizer.train import train_tokenizer

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "TokenizerConfig",
    "import_tokenizer",
    "load_config",
    "load_tokenizer",
    "tokenizer_report",
    "train_tokenizer",
]
