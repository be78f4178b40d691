"""Train a tokenizer with the Rust `tokenizers` library on a bounded sample of the corpus.

Id layout of a trained tokenizer (all kinds):

    0 ..            special tokens in the order pad, bos, eos, unk, mask, <extra_id_0>, ...
    then 256        byte tokens <0x00> ... <0xFF>            (bpe and unigram: byte fallback)
    then            the learned vocabulary
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from slmforge import config as config_io
from slmforge.text.mixture import sample_sentences
from slmforge.text.sampling import reservoir_sample
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.tokenizer import akshara, pretokenize
from slmforge.tokenizer.config import TokenizerConfig
from slmforge.tokenizer.sample import check_mixture_record, sample_inputs, warn_about_training
from slmforge.tokenizer.tokenizer import Tokenizer, bos_post_processor

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def train_tokenizer(cfg: TokenizerConfig, out_dir: str | Path, texts: Iterable[str] | None = None,
                    *, progress: bool = False) -> Path:
    """Sample sentences (from `texts`, else `cfg.mixture`, else `cfg.inputs`), train, save.

    Returns the output folder, loadable by `load_tokenizer` and `AutoTokenizer.from_pretrained`.
    """
    config_io.validate(cfg)
    sentences, record = sample_sentences_for(cfg, texts, say=say if progress else None)
    if not sentences:
        where = "texts" if texts is not None else ", ".join(cfg.inputs) or "the mixture"
        raise SlmforgeError(f"tokenizer: training input has no text ({where})")
    if progress:
        say(f"training a {cfg.kind} tokenizer (vocab {cfg.vocab_size}) on {len(sentences):,} sentences")
    # The trainer's progress bar is for terminals; in logs it only leaves blank lines.
    tok = train_on_sentences(cfg, sentences, show_progress=progress and sys.stderr.isatty())
    warn_about_training(cfg, record, tok.vocab_size)  # split long lines, a vocabulary smaller than asked
    # asdict, not config.to_dict: the latter does not descend into lists of sections (mixture sources).
    tok.meta.update({"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "sample": record})
    out = tok.save(out_dir)
    if progress:
        say(f"wrote {out} ({tok.kind}, {tok.vocab_size} ids, sha256 {tok.sha256[:12]})")
    return out


def sample_sentences_for(cfg: TokenizerConfig, texts: Iterable[str] | None = None,
                         say: Callable[[str], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The bounded training sample and its record (what was drawn from where, with which seed)."""
    if texts is not None:
        return reservoir_sample([("texts", texts)], cfg.max_sentences, cfg.max_chars, cfg.seed, say)
    if cfg.mixture is not None:
        if say is not None:
            say(f"sampling {cfg.max_sentences:,} sentences from {len(cfg.mixture.sources)} mixture sources")
        sentences, record = sample_sentences(cfg.mixture, cfg.max_sentences, cfg.max_chars)
        check_mixture_record(record)
        return sentences, {"method": "mixture", **record}
    if not cfg.inputs:
        raise SlmforgeError("tokenizer.inputs: no training text; set tokenizer.inputs (files or "
                            "folders of .txt/.jsonl), tokenizer.mixture, or pass --input")
    return sample_inputs(cfg.inputs, cfg.text_field, cfg.max_sentences, cfg.max_chars, cfg.seed, say)


def train_on_sentences(cfg: TokenizerConfig, sentences: list[str], show_progress: bool = False) -> Tokenizer:
    """Train `cfg.kind` on in-memory sentences (already sampled and length-capped)."""
    specials = [AddedToken(t, special=True, normalized=False) for t in cfg.special_tokens()]
    byte_fallback = cfg.kind in ("bpe", "unigram")
    learned = cfg.vocab_size - (256 if byte_fallback else 0)  # byte tokens are added after training
    norm = pretokenize.normalizer(cfg.normalization, cfg.lowercase)
    roles = cfg.roles()

    if cfg.akshara:  # bpe or unigram (validate checks): see akshara.py
        backend = _train_akshara(cfg, sentences, norm, specials, learned, show_progress)
    else:
        backend = _train_plain(cfg, sentences, norm, specials, learned, show_progress)
    if byte_fallback:
        backend = add_byte_fallback(backend, len(cfg.special_tokens()))
    bos = roles["bos"]
    post = bos_post_processor(bos, backend.token_to_id(bos) if bos else None)
    if post is not None:
        backend.post_processor = post
    return Tokenizer(backend, roles, cfg.sentinels(), {"kind": cfg.kind})


def _train_plain(cfg: TokenizerConfig, sentences: list[str], norm, specials: list[AddedToken], learned: int,
                 show_progress: bool) -> BackendTokenizer:
    roles = cfg.roles()
    if cfg.kind == "unigram":
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(
            vocab_size=learned, special_tokens=specials, unk_token=roles["unk"],
            max_piece_length=cfg.max_token_chars, initial_alphabet=["\n"], show_progress=show_progress)
    elif cfg.kind == "wordpiece":
        model = models.WordPiece(unk_token=roles["unk"])
        trainer = trainers.WordPieceTrainer(
            vocab_size=learned, min_frequency=cfg.min_frequency, special_tokens=specials,
            continuing_subword_prefix="##", show_progress=show_progress,
            **_alphabet(sentences, norm, cfg))
    else:  # bpe, bytelevel
        model = models.BPE(unk_token=roles["unk"] if cfg.kind == "bpe" else None)
        if cfg.kind == "bytelevel":  # all 256 byte symbols from the start: nothing is ever unknown
            alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
        else:
            alphabet = _alphabet(sentences, norm, cfg)
        trainer = trainers.BpeTrainer(
            vocab_size=learned, min_frequency=cfg.min_frequency, special_tokens=specials,
            max_token_length=cfg.max_token_chars, show_progress=show_progress, **alphabet)

    backend = BackendTokenizer(model)
    if norm is not None:
        backend.normalizer = norm
    backend.pre_tokenizer = pretokenize.pre_tokenizer(cfg.kind, cfg.split_digits)
    backend.decoder = pretokenize.decoder(cfg.kind)
    backend.train_from_iterator(sentences, trainer, length=len(sentences))
    return backend


def _train_akshara(cfg: TokenizerConfig, sentences: list[str], norm, specials: list[AddedToken], learned: int,
                   show_progress: bool) -> BackendTokenizer:
    """Train on the normalized text with every frequent akshara spelled as one symbol (akshara.py)."""
    texts = [norm.normalize_str(s) for s in sentences] if norm is not None else list(sentences)
    training_split = pretokenize.pre_tokenizer(cfg.kind, cfg.split_digits, private_use=True)
    unk = cfg.roles()["unk"]
    if cfg.kind == "bpe":
        chars = _alphabet(texts, None, cfg)["initial_alphabet"]
        backend = akshara.train_bpe(texts, chars, specials, unk, learned, cfg.min_frequency,
                                    cfg.max_token_chars, training_split, show_progress)
    else:
        backend = akshara.train_unigram(texts, specials, unk, learned, cfg.min_frequency, cfg.max_token_chars,
                                        training_split, show_progress)
    if norm is not None:
        backend.normalizer = norm
    backend.pre_tokenizer = pretokenize.pre_tokenizer(cfg.kind, cfg.split_digits)
    backend.decoder = pretokenize.decoder(cfg.kind)
    return backend


def _alphabet(sentences: list[str], norm, cfg: TokenizerConfig) -> dict[str, Any]:
    """Trainer arguments that fix the character alphabet: the most frequent characters covering
    `character_coverage` of the sample (SentencePiece's rule), plus '\n'. Rarer characters fall
    back to bytes (bpe) or <unk> (wordpiece).

    We choose the characters ourselves, ties broken by code point, and hand them over as the
    initial alphabet with a limit of exactly that many: the trainer's own `limit_alphabet` cut
    breaks count ties in hash-map order, which made two identical runs differ.
    """
    counts: Counter[str] = Counter()
    for s in sentences:
        counts.update(norm.normalize_str(s) if norm is not None else s)
    room = cfg.vocab_size - len(cfg.special_tokens()) - (256 if cfg.kind == "bpe" else 0)
    chars = ["\n"]
    covered, total = 0, sum(counts.values())
    for char, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= cfg.character_coverage * total or len(chars) >= room:
            break
        covered += n
        if char != "\n":
            chars.append(char)
    return {"initial_alphabet": chars, "limit_alphabet": len(chars)}


def add_byte_fallback(backend: BackendTokenizer, num_special: int) -> BackendTokenizer:
    """Insert <0x00>..<0xFF> right after the special tokens and switch byte fallback on, so a
    character the vocabulary lacks becomes its UTF-8 bytes instead of <unk>.

    `tokenizers` trainers do not create byte tokens themselves (SentencePiece does), so the learned
    ids move up by 256. The byte tokens can never match text: the pre-tokenizer splits '<' and
    '0x' apart, so no pre-token ever spells '<0x41>'.
    """
    data = json.loads(backend.to_str())
    model = data["model"]
    if model["type"] == "BPE":
        vocab = {t: (i if i < num_special else i + 256) for t, i in model["vocab"].items()}
        vocab.update({t: num_special + b for b, t in enumerate(BYTE_TOKENS)})
        model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    else:  # Unigram: a list of [piece, log-prob]; bytes are reached only through byte fallback
        pieces = model["vocab"]
        floor = min((score for _, score in pieces[num_special:]), default=0.0)
        model["vocab"] = pieces[:num_special] + [[t, floor] for t in BYTE_TOKENS] + pieces[num_special:]
        if model.get("unk_id") is not None and model["unk_id"] >= num_special:
            model["unk_id"] += 256
    model["byte_fallback"] = True
    for added in data.get("added_tokens", []):
        if added["id"] >= num_special:
            added["id"] += 256
    return BackendTokenizer.from_str(json.dumps(data))
