"""`slmforge export RUN --format gguf --out FILE.gguf`: a decoder run as one GGUF file for llama.cpp.

    FILE.gguf
        general.*, {arch}.*      llama / gemma3 / qwen3 / smollm3 hyperparameters, as llama.cpp reads them
        tokenizer.ggml.*         the run's own tokenizer: tokens, scores or merges, token types, bos / eos /
                                 pad / unk ids, whether bos is prepended; tokenizer.chat_template if any
        slmforge.*               where it came from: checkpoint step, tokenizer sha256, the tokenizer check
        tensors                  llama.cpp's names (gguf's tensor name map from transformers' names), in
                                 f32, f16 or q8_0 (1-D tensors stay f32)

Weights follow what llama.cpp's own converter does: Gemma 3 norms store 1 + w (llama.cpp multiplies by
the weight), Llama and SmolLM3 q/k rows are permuted to llama.cpp's interleaved RoPE pairs, llama3 RoPE
scaling becomes the `rope_freqs` tensor, a vocabulary padded beyond the tokenizer gets unused tokens.
What llama.cpp cannot express (another attention scale, a NoPE pattern other than SmolLM3's every 4th
layer, biases the architecture has no tensor for) is refused in one line.

The tokenizer is never approximated silently. llama.cpp has a fixed set of tokenizers, so each of ours
is written as the one that can reproduce it, and then *measured*: llama.cpp's tokenization (a faithful
model of its code here, and llama.cpp itself when `llama_cpp` is importable) of a sample must give the
ids slmforge gives, or no file is written and the message says how many sample texts differ:

    slmforge kind                 llama.cpp tokenizer            outcome
    bpe (byte fallback, akshara)  "llama" (SentencePiece merges) written when the sample matches
    bytelevel (our letters+marks  "gpt2" + a pre-tokenizer       refused: no llama.cpp pre-tokenizer is
      split)                                                     ours (the rate against the closest)
    bytelevel (GPT-2 / Llama 3 /  "gpt2" + that pre-tokenizer    written when the sample matches
      Qwen regex, e.g. imported)
    unigram (byte fallback)       "t5" (unigram, Viterbi)        refused: llama.cpp's unigram has no byte
                                                                 fallback (an unseen character is <unk>)
    wordpiece                     -                              refused

The sample is a multilingual probe (Hindi, Bengali, Assamese, Tamil, German, English, digits, emoji,
whitespace runs), text of the run's own data when it is there, and every vocabulary entry alone and
after a run of spaces.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmforge.errors import SlmforgeError

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
FAMILIES = ("llama", "gemma3", "qwen3", "smollm3")
SPACE = "\u2581"  # SentencePiece's visible space; llama.cpp's "llama" and "t5" tokenizers read spaces so
WHERE = "export --format gguf"

# llama.cpp's pre-tokenizers for byte-level BPE (`tokenizer.ggml.pre`) whose regex is one expression:
# name -> the regex as tokenizer.json spells it (llama.cpp's src/llama-vocab.cpp quotes the same ones).
PRE_TOKENIZERS = {
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# gguf.TokenType values (kept here so the tokenizer half needs no `gguf` import)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The probe every tokenizer check starts with: the scripts slmforge is built for, and what tends to
# differ between tokenizer implementations (marks and ZWJ inside words, digits after spaces, quotes,
# emoji and flags, runs of spaces before words, trailing spaces, blank lines, tabs, CRLF).
PROBE = [unicodedata.normalize("NFC", s) for s in [
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "मैं कल बाज़ार जाऊँगा; क्षत्रिय, श्री, ऋषि, अँधेरा, र\u200d्याब।",
    "বাংলা ভাষা খুব মিষ্টি। আমি কাল কলকাতায় যাব, র\u200d্যাব আর ক্ষমা।",
    "অসমীয়া ভাষা অসমৰ ৰাজ্যিক ভাষা; ব্ৰহ্মপুত্ৰ নদী। ৰ ৱ ক্ষ ৎ ১২৩৪",
    "தமிழ் ஒரு செம்மொழி ஆகும். நான் நாளை சென்னைக்குப் போவேன்.",
    "Grüße aus Köln: die Straße, das Mädchen, ÄÖÜ äöü ß ẞ, übermorgen.",
    "The quick brown fox jumps over the lazy dog. It's 'really' 'Dogs' don't (see: §3).",
    "In 2024, 1 2 3 and 12345 and 3.14159 and ०१२३४५ and ১২৩ and 10,000.",
    "emoji 😀👍🏽 and flags 🇮🇳🇩🇪 and ✓ ★ → ∞ 𝄞 ꙮ",
    "mixed हिन्दी + অসমীয়া + English + Deutsch + தமிழ்",
    "   three spaces, then    four,\tone tab,\t\ttwo tabs, and  two.",
    "trailing spaces   \nnext line  \n\n\nparagraph.\n\nAnother one!\n",
    "line one\r\nline two\r\n\r\n  indented\n    more indented\n\tcode();\n",
    "    😀 after spaces,    ক after spaces,     5 after spaces,   . after spaces",
    "quote\"s, (parens), [brackets], {braces}, <angle>, a/b, a-b, a_b, a.b, ...",
    "compatibility characters ﬁ ² ① Ａ ｶ, which NFKC would rewrite, and UPPER Case",
    "",
]]


# ---------------------------------------------------------------- llama.cpp's tokenizers, in Python


class SpmTokenizer:
    """llama.cpp's "llama" tokenizer (llm_tokenizer_spm): spaces become U+2581, then, over the whole
    text, the adjacent pair whose concatenation is a token with the highest score merges first (ties:
    leftmost); a symbol that is no token becomes byte tokens <0xNN>."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int]):
        self.ids = {t: i for i, t in enumerate(tokens)}  # llama.cpp looks up every token's text
        self.scores = scores
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == BYTE}

    def __call__(self, text: str) -> list[int]:
        text = text.replace(" ", SPACE)
        syms = [[c, i - 1, i + 1] for i, c in enumerate(text)]  # text, prev, next
        if not syms:
            return []
        syms[-1][2] = -1
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            joined = syms[left][0] + syms[right][0]
            token = self.ids.get(joined)
            if token is not None:
                heapq.heappush(heap, (-self.scores[token], left, right, len(joined)))

        for i in range(1, len(syms)):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a[0] or not b[0] or len(a[0]) + len(b[0]) != size:
                continue  # one side merged since
            a[0] += b[0]
            b[0] = ""
            a[2] = b[2]
            if b[2] >= 0:
                syms[b[2]][1] = left
            push(a[1], left)
            push(left, a[2])
        out, i = [], 0
        while i != -1:
            piece = syms[i][0]
            if piece in self.ids:
                out.append(self.ids[piece])
            else:
                out.extend(self.byte_ids[b] for b in piece.encode("utf-8"))
            i = syms[i][2]
        return out


class UgmTokenizer:
    """llama.cpp's "t5" tokenizer (llm_tokenizer_ugm) without a normalization map: spaces become U+2581,
    then Viterbi over the whole text with the pieces' scores; a character no piece covers is the unknown
    token (score: lowest piece score - 10), and runs of unknowns become one."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], unk_id: int):
        # user-defined pieces score 0 there, to be preferred over the (negative) log probabilities
        self.pieces = {t: (i, 0.0 if types[i] == USER_DEFINED else scores[i]) for i, t in enumerate(tokens)
                       if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
        normal = [scores[i] for i, kind in enumerate(types) if kind == NORMAL]
        self.unk_id, self.unk_score = unk_id, min(normal) - 10.0
        self.longest = max(len(t) for t in self.pieces)

    def __call__(self, text: str) -> list[int]:
        text = text.replace(" ", SPACE)
        n = len(text)
        best: list[tuple[float, int, int]] = [(-math.inf, -1, -1)] * (n + 1)
        best[0] = (0.0, -1, -1)
        for start in range(n):
            here = best[start][0]
            whole_char = False
            for end in range(start + 1, min(n, start + self.longest) + 1):
                piece = self.pieces.get(text[start:end])
                if piece is None:
                    continue
                whole_char |= end == start + 1
                score = here + piece[1]
                if score > best[end][0]:
                    best[end] = (score, piece[0], start)
            if not whole_char and here + self.unk_score > best[start + 1][0]:
                best[start + 1] = (here + self.unk_score, self.unk_id, start)
        out, end, previous_unknown = [], n, False
        while end > 0:
            _, token, start = best[end]
            if not (previous_unknown and token == self.unk_id):
                out.append(token)
            previous_unknown, end = token == self.unk_id, start
        return out[::-1]


def regex_bpe_tokenizer(backend_json: str, pattern: str) -> Callable[[str], list[int]]:
    """llama.cpp's "gpt2" tokenizer with a given pre-tokenizer regex: the same BPE model and merges
    behind that regex, with no normalizer (llama.cpp has none)."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer

    data = json.loads(backend_json)
    data["normalizer"] = None
    data["post_processor"] = None
    backend = BackendTokenizer.from_str(json.dumps(data))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return lambda text: backend.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- the vocabulary GGUF holds


@dataclass
class Mismatch:
    differ: int
    total: int
    example: tuple[str, list[int], list[int]] | None = None

    @property
    def rate(self) -> float:
        return self.differ / max(self.total, 1)

    def describe(self) -> str:
        return f"{self.differ:,} of {self.total:,} sample texts ({100 * self.rate:.1f}%)"


@dataclass
class GgufVocab:
    """The tokenizer.ggml.* metadata for one tokenizer, and llama.cpp's tokenization of it."""

    model: str                          # tokenizer.ggml.model: "llama", "gpt2" or "t5"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None              # tokenizer.ggml.pre ("gpt2" model)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, mask -> id
    add_bos: bool = False
    chat_template: str | None = None
    what: str = ""                      # how ours maps onto llama.cpp's, for messages and the docs
    nfc: bool = False                   # ours NFC-normalizes text first; llama.cpp normalizes nothing
    simulate: Callable[[str], list[int]] | None = None
    checked: Mismatch | None = None


class TokenizerRefused(SlmforgeError):
    """llama.cpp would tokenize this tokenizer's text differently (measured)."""


def sample_texts(tokenizer, data_dir: Path | None = None, max_data_tokens: int = 200_000) -> list[str]:
    """The texts the tokenizer check compares on: PROBE, lines of the run's data, every vocabulary
    entry alone and after three spaces."""
    texts = list(PROBE)
    texts += data_sample(tokenizer, data_dir, max_data_tokens) if data_dir is not None else []
    for i in range(tokenizer.vocab_size):
        if i in tokenizer.special_ids or i in tokenizer.byte_ids:
            continue
        text = tokenizer.decode([i], skip_special=True)
        if text:
            texts.append(text)
            if not text[0].isspace():
                texts.append("   " + text)
    texts.append(" ".join(PROBE))  # one long text: merges across everything above
    return texts


def data_sample(tokenizer, data_dir: Path, max_tokens: int) -> list[str]:
    """Up to `max_tokens` tokens of the run's prepared data (the first validation shard, else the first
    training shard), decoded back to text document by document and cut into lines (empty when the
    data is not there any more)."""
    from slmforge.fileio import inside, read_json

    try:
        manifest = read_json(data_dir / "manifest.json")
        splits = manifest["splits"]
        shard = next(split["shards"][0] for name in ("val", "train") if (split := splits.get(name)) and split["shards"])
        path = inside(data_dir, shard.get("name"), "manifest.json names a shard")
        ids = np.asarray(np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")[:max_tokens], dtype=np.int64)
    except (OSError, KeyError, IndexError, TypeError, ValueError, StopIteration, SlmforgeError):
        return []
    ids = ids[ids < tokenizer.vocab_size]
    bounds = {i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
    cuts = [0] + [k + 1 for k in np.flatnonzero(np.isin(ids, list(bounds))).tolist()] + [len(ids)]
    lines: list[str] = []
    for start, end in zip(cuts, cuts[1:]):
        text = tokenizer.decode(ids[start:end].tolist(), skip_special=True)
        lines += [line for line in text.splitlines(keepends=True) if line.strip()]
    return lines


def measure(tokenizer, simulate: Callable[[str], list[int]], texts: list[str]) -> Mismatch:
    """How many of `texts` `simulate` tokenizes other than slmforge does (no special tokens added, and
    special-token strings read as text, as llama.cpp's tokenize(special=False) reads them)."""
    from tokenizers import Tokenizer as BackendTokenizer

    backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    backend.encode_special_tokens = True
    ours = [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    result = Mismatch(0, len(texts))
    for text, expected in zip(texts, ours):
        got = simulate(text)
        if got != expected:
            result.differ += 1
            if result.example is None or len(text) < len(result.example[0]):
                result.example = (text, expected, got)
    return result


def gguf_vocab(tokenizer, n_vocab: int, add_bos: bool, texts: list[str]) -> GgufVocab:
    """The GGUF vocabulary for `tokenizer` (padded with unused tokens to the model's `n_vocab` rows),
    checked on `texts`; raises TokenizerRefused when llama.cpp would tokenize them differently."""
    if tokenizer.vocab_size > n_vocab:
        raise SlmforgeError(f"{WHERE}: the tokenizer has {tokenizer.vocab_size} ids, the model only "
                            f"{n_vocab} embedding rows")
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    kind = model.get("type")
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
    if kind == "BPE" and not byte_level and model.get("byte_fallback"):
        candidates = _spm_candidates(tokenizer, model, n_vocab)
    elif kind == "BPE" and byte_level:
        candidates = _gpt2_candidates(tokenizer, data, n_vocab)
    elif kind == "Unigram":
        candidates = _ugm_candidates(tokenizer, model, n_vocab)
    else:
        raise TokenizerRefused(f"{WHERE}: not written: a {tokenizer.kind} tokenizer has no llama.cpp equivalent "
                               f"for a decoder (llama.cpp reads SentencePiece-style BPE, byte-level BPE and "
                               f"unigram); --format hf keeps it exactly")
    best: GgufVocab | None = None
    reason: str | None = None
    for vocab, exact_kind in candidates:
        _check_unique(vocab)
        vocab.checked = measure(tokenizer, vocab.simulate, texts)
        if vocab.checked.differ == 0 and exact_kind is None:
            return _finish(vocab, tokenizer, add_bos)
        if best is None or vocab.checked.differ < best.checked.differ:
            best, reason = vocab, exact_kind
    if best is None:
        raise TokenizerRefused(f"{WHERE}: not written: llama.cpp's unigram tokenizer needs an unknown token; "
                               f"this {tokenizer.kind} tokenizer has none")
    raise TokenizerRefused(refusal(tokenizer, best, reason))


def _check_unique(vocab: GgufVocab) -> None:
    """llama.cpp needs every token text once (it maps text to id); spaces written as U+2581 must not
    meet a token that already spelled U+2581."""
    seen: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        if token in seen:
            raise TokenizerRefused(f"{WHERE}: not written: ids {seen[token]} and {i} would both be {token!r} in "
                                   f"llama.cpp's vocabulary (it writes spaces as U+2581 '{SPACE}'); --format hf "
                                   f"keeps the tokenizer exactly")
        seen[token] = i


def refusal(tokenizer, vocab: GgufVocab, reason: str | None) -> str:
    checked = vocab.checked
    if checked.differ == 0:  # refused for its rules, which the sample happened not to exercise
        return (f"{WHERE}: not written: this run's {tokenizer.kind} tokenizer has no exact llama.cpp equivalent "
                f"({reason}); it gave the same ids on all {checked.total:,} sample texts (0.0% differ), but other "
                f"text would differ. --format hf keeps the tokenizer exactly")
    text = f"{WHERE}: not written: llama.cpp would tokenize {checked.describe()} differently from this run's " \
           f"{tokenizer.kind} tokenizer ({reason or vocab.what})"
    if checked.example is not None:
        sample, ours, theirs = checked.example
        text += f"; e.g. {sample[:40]!r}: slmforge {ours[:8]}, llama.cpp {theirs[:8]}"
    return text + ". A GGUF file must tokenize as the model was trained; --format hf keeps the tokenizer exactly"


def _finish(vocab: GgufVocab, tokenizer, add_bos: bool) -> GgufVocab:
    from slmforge.tokenizer.chat import tokenizer_chat_template

    vocab.special = {role: i for role, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                                               ("unk", tokenizer.unk_id), ("pad", tokenizer.pad_id),
                                               ("mask", tokenizer.mask_id)) if i is not None}
    vocab.add_bos = add_bos and tokenizer.bos_id is not None
    vocab.chat_template = tokenizer_chat_template(tokenizer)
    vocab.nfc = "NFC" in json.dumps(json.loads(tokenizer.backend.to_str()).get("normalizer"))
    return vocab


def _token_types(tokenizer, n_vocab: int) -> list[int]:
    added = tokenizer.backend.get_added_tokens_decoder()
    types = []
    for i in range(n_vocab):
        if i >= tokenizer.vocab_size or tokenizer.id_to_token(i) is None:
            types.append(UNUSED)
        elif i == tokenizer.unk_id:
            types.append(UNKNOWN)
        elif i in tokenizer.special_ids:
            types.append(CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif i in tokenizer.byte_ids:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _raw_tokens(tokenizer, n_vocab: int) -> list[str]:
    """Token strings by id; ids past the tokenizer (a padded embedding) get unused placeholders."""
    return [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(n_vocab)]


def _spm_candidates(tokenizer, model: dict[str, Any], n_vocab: int):
    """BPE with byte fallback as llama.cpp's SentencePiece tokenizer: a token's score is minus the rank
    of the first merge that makes it, so merges happen in the order of the merge list. Without word
    boundaries, llama.cpp may join spaces to each other before the last one joins the word after them;
    ranking whitespace-only tokens after all others keeps the space with the word, as our split does.
    Both scorings are tried; the first that matches on every sample text is written."""
    types = _token_types(tokenizer, n_vocab)
    if len(tokenizer.byte_ids) < 256:
        raise TokenizerRefused(f"{WHERE}: not written: byte fallback with {len(tokenizer.byte_ids)} of the 256 byte "
                               f"tokens <0x00>..<0xFF>; llama.cpp needs them all")
    tokens = [t.replace(" ", SPACE) if types[i] == NORMAL else t for i, t in enumerate(_raw_tokens(tokenizer, n_vocab))]
    rank: dict[str, int] = {}
    for k, merge in enumerate(model.get("merges", [])):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(a + b, k)
    n = len(rank) + 1
    raw = _raw_tokens(tokenizer, n_vocab)
    for lower in (False, True):
        scores = []
        for i, token in enumerate(raw):
            r = rank.get(token) if types[i] == NORMAL else None
            if r is None:
                scores.append(0.0 if len(token) == 1 else -3.0 * n)
            else:
                scores.append(-float(r + 1) - (n if lower and not token.strip() else 0))
        vocab = GgufVocab("llama", tokens, types, scores=scores,
                          what="BPE with byte fallback as llama.cpp's SentencePiece tokenizer 'llama'")
        vocab.simulate = SpmTokenizer(tokens, scores, types)
        yield vocab, None


def _gpt2_candidates(tokenizer, data: dict[str, Any], n_vocab: int):
    """Byte-level BPE as llama.cpp's "gpt2" tokenizer: exact only with a pre-tokenizer llama.cpp has."""
    types = _token_types(tokenizer, n_vocab)
    tokens = _raw_tokens(tokenizer, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    ours = _byte_level_regex(data.get("pre_tokenizer"))
    named = next((name for name, pattern in PRE_TOKENIZERS.items() if pattern == ours), None)
    order = [named] if named else list(PRE_TOKENIZERS)
    backend_json = tokenizer.backend.to_str()
    for name in order:
        vocab = GgufVocab("gpt2", tokens, types, merges=merges, pre=name,
                          what=f"byte-level BPE as llama.cpp's 'gpt2' tokenizer with pre-tokenizer {name!r}")
        vocab.simulate = regex_bpe_tokenizer(backend_json, PRE_TOKENIZERS[name])
        reason = None if named else (f"byte-level BPE whose pre-tokenizer is none of llama.cpp's "
                                     f"({', '.join(PRE_TOKENIZERS)}); the closest is {name!r}, which splits "
                                     f"contractions such as 're, a space from a digit and ZWJ from a word "
                                     f"where slmforge's split does not")
        yield vocab, reason


def _byte_level_regex(pre: dict[str, Any] | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer (GPT-2's for ByteLevel with use_regex)."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return PRE_TOKENIZERS["gpt-2"] if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            return steps[0].get("pattern", {}).get("Regex")
    return None


def _ugm_candidates(tokenizer, model: dict[str, Any], n_vocab: int):
    """Unigram as llama.cpp's unigram tokenizer "t5": the same pieces and scores and Viterbi, but no
    byte fallback there (an unseen character becomes <unk>, not its bytes)."""
    types = _token_types(tokenizer, n_vocab)
    scores = [0.0] * n_vocab
    for i, (_, score) in enumerate(model.get("vocab", [])):
        scores[i] = float(score)
    tokens = [t.replace(" ", SPACE) if types[i] == NORMAL else t for i, t in enumerate(_raw_tokens(tokenizer, n_vocab))]
    if tokenizer.unk_id is None:
        return
    vocab = GgufVocab("t5", tokens, types, scores=scores,
                      what="unigram as llama.cpp's unigram tokenizer 't5'")
    vocab.simulate = UgmTokenizer(tokens, scores, types, tokenizer.unk_id)
    reason = ("unigram with byte fallback; llama.cpp's unigram tokenizer has none, so a character outside "
              "the vocabulary becomes <unk> there and its UTF-8 bytes here") if model.get("byte_fallback") else None
    yield vocab, reason


def add_vocab(writer, vocab: GgufVocab) -> None:
    """Write tokenizer.ggml.* (and tokenizer.chat_template) for `vocab`."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id, "mask": writer.add_mask_token_id}
    for role, token_id in vocab.special.items():
        setters[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.model in ("llama", "t5"):
        writer.add_add_space_prefix(False)  # our tokenizers keep text as it is: no dummy leading space
        writer.add_remove_extra_whitespaces(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    if vocab.nfc:  # llama.cpp does not normalize: say so where a program reading the file can see it
        writer.add_string("slmforge.tokenizer.normalization", "NFC")


# ---------------------------------------------------------------- the model


def check_gguf_exportable(cfg) -> str:
    """The llama.cpp architecture for `cfg`; raises naming the first thing llama.cpp cannot express."""
    from slmforge.models.hf import check_exportable

    check_exportable(cfg)
    family = cfg.family
    nope = [i for i in range(cfg.num_layers) if not cfg.uses_rope(i)]
    if family == "smollm3":
        every_4th = [i for i in range(cfg.num_layers) if (i + 1) % 4 == 0]
        if not nope:
            family = "llama"  # no NoPE layers: a Llama
        elif nope != every_4th:
            raise SlmforgeError(f"{WHERE}: model.nope_every: llama.cpp's smollm3 leaves out RoPE on every 4th "
                                f"layer exactly; this model has none on layers {nope[:4]}...")
    if cfg.rope_scaling == "llama3" and family != "llama":
        raise SlmforgeError(f"{WHERE}: model.rope_scaling: llama.cpp's {family} has no llama3 RoPE scaling "
                            f"(only its llama architecture reads rope_freqs)")
    if cfg.out_bias and family != "llama":
        raise SlmforgeError(f"{WHERE}: model.out_bias: llama.cpp's {family} has no attention output bias")
    if family == "gemma3":  # llama.cpp: 1/sqrt(head_dim), or 1/sqrt(hidden // heads) for 62 layers (27B)
        expected = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
        used = cfg.query_pre_attn_scalar or cfg.head_dim
        if float(used) != float(expected):
            raise SlmforgeError(f"{WHERE}: model.query_pre_attn_scalar: llama.cpp's gemma3 scales attention by "
                                f"{expected} ** -0.5 for a {cfg.num_layers}-layer model; this one uses {used:g}")
    return family


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split RoPE pairs (i, i + d/2) -> llama.cpp's interleaved pairs (2i, 2i + 1),
    as llama.cpp's converter permutes q_proj / k_proj rows (and biases) for its llama architecture."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(cfg, arch: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names (float32), transformed as llama.cpp expects them."""
    import gguf

    from slmforge.models.hf import state_dict_to_hf
    from slmforge.models.layers import rope_inverse_frequencies

    model_arch = _model_arch(arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_layers)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch]}
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in state_dict_to_hf(cfg, state_dict, torch.float32).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name.rsplit(".", 1)[0].replace(_block(name), "blk.{bid}") not in allowed:
            raise SlmforgeError(f"{WHERE}: {hf_name}: llama.cpp's {arch} has no tensor for it")
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            tensor = tensor + 1.0  # Gemma3RMSNorm scales by (1 + w); llama.cpp by the stored weight
        if arch in ("llama", "smollm3") and ".self_attn.q_proj." in hf_name:
            tensor = permute_rope(tensor, cfg.num_heads)
        if arch in ("llama", "smollm3") and ".self_attn.k_proj." in hf_name:
            tensor = permute_rope(tensor, cfg.num_kv_heads)
        out[name] = tensor.contiguous()
    if cfg.rope_scaling == "llama3":  # llama.cpp divides each pair's frequency by its factor
        plain = rope_inverse_frequencies(cfg, cfg.rope_theta, scaled=False)
        scaled = rope_inverse_frequencies(cfg, cfg.rope_theta, scaled=True)
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (plain / scaled).float()
    return out


def _block(name: str) -> str:
    parts = name.split(".")
    return f"blk.{parts[1]}" if parts[0] == "blk" else "\0"


def _model_arch(arch: str):
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3": gguf.MODEL_ARCH.GEMMA3, "qwen3": gguf.MODEL_ARCH.QWEN3,
            "smollm3": gguf.MODEL_ARCH.SMOLLM3}[arch]


def _encode_tensor(tensor: torch.Tensor, dtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors stay f32, as llama.cpp's converter keeps
    norms and biases; q8_0 falls back to f16 for rows not a multiple of its 32-value blocks."""
    import gguf

    array = tensor.detach().cpu().float().numpy()
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def add_hparams(writer, cfg, arch: str, n_vocab: int) -> None:
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(n_vocab)
    if cfg.rope_scaling == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if arch == "gemma3":
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        if any(sliding):
            writer.add_sliding_window(cfg.sliding_window)
            writer.add_sliding_window_pattern(sliding)
            local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
            writer.add_rope_freq_base_swa(local)
        if cfg.final_logit_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcap)


# ---------------------------------------------------------------- export


@dataclass
class GgufExport:
    path: Path
    arch: str
    dtype: str
    vocab: GgufVocab
    llama_cpp_checked: bool


def export_gguf(run: str | Path, out: str | Path, dtype: str = "f32", force: bool = False) -> GgufExport:
    """Write the decoder of a run (or checkpoint) folder as one GGUF file `out`, atomically: nothing is
    left at `out` unless the whole file was written and its tokenizer checked."""
    if dtype not in DTYPES:
        raise SlmforgeError(f"--dtype: GGUF export takes {', '.join(DTYPES)}, got {dtype!r}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SlmforgeError(f"{WHERE}: needs the `gguf` package (pip install 'slmforge[gguf]')") from None
    from slmforge.checkpoint.reading import check_tokenizer, find_tokenizer_dir, open_run, recorded_data_dir
    from slmforge.models.registry import family
    from slmforge.tokenizer import load_tokenizer

    out = Path(out)
    if out.is_dir():
        raise SlmforgeError(f"{out}: is a folder; --format gguf writes one file (e.g. --out {out}/model.gguf)")
    if out.exists() and not force:
        raise SlmforgeError(f"{out}: exists; choose another file or pass --force")
    opened = open_run(run)
    model, step_dir, info = opened.model, opened.step_dir, opened.info
    cfg = model.cfg
    kind = family(cfg).kind
    if kind != "decoder":
        raise SlmforgeError(f"{WHERE}: {run} is an {kind} ({cfg.family}); GGUF export is for decoders "
                            f"({', '.join(FAMILIES)}); use --format hf")
    arch = check_gguf_exportable(cfg)
    tokenizer_dir = find_tokenizer_dir(run)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer(tokenizer.sha256, tokenizer_dir, step_dir, info)
    texts = sample_texts(tokenizer, recorded_data_dir(step_dir, info))
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, info.add_bos, texts)
    tensors = gguf_tensors(cfg, arch, model.state_dict())
    del model, opened

    name = step_dir.parent.parent.name if step_dir.parent.name == "checkpoints" else step_dir.name
    extra = {"slmforge.tokenizer.sha256": tokenizer.sha256, "slmforge.tokenizer.checked_texts": vocab.checked.total}
    if info.step is not None:
        extra["slmforge.checkpoint.step"] = info.step
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_gguf(tmp, cfg, arch, tensors, vocab, dtype, name=name, extra=extra)
        checked = check_with_llama_cpp(tmp, tokenizer, texts)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    from slmforge import fileio

    fileio.make_readable(out)
    return GgufExport(out, arch, dtype, vocab, checked)


def write_gguf(path: Path, cfg, arch: str, tensors: dict[str, torch.Tensor], vocab: GgufVocab, dtype: str,
               name: str, extra: dict[str, Any] | None = None) -> None:
    """One GGUF file at `path` (fsynced): hyperparameters, vocabulary, `extra` keys, tensors in `dtype`."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, cfg, arch, cfg.vocab_size)
        add_vocab(writer, vocab)
        for key, value in (extra or {}).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_uint64(key, int(value))
        for tensor_name, tensor in tensors.items():
            data, raw_dtype = _encode_tensor(tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def check_with_llama_cpp(path: Path, tokenizer, texts: list[str]) -> bool:
    """When `llama_cpp` is importable: tokenize `texts` with llama.cpp itself from the written file and
    refuse on any difference. Returns whether the check ran."""
    try:
        import llama_cpp
    except ImportError:
        return False
    try:  # llama.cpp logs some lines even when asked not to
        from llama_cpp._utils import suppress_stdout_stderr

        quiet = suppress_stdout_stderr(disable=False)
    except (ImportError, TypeError):
        quiet = contextlib.nullcontext()
    try:
        with quiet:
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as e:  # e.g. an older llama.cpp that does not know the architecture yet
        log.warning("%s: the installed llama.cpp (llama-cpp-python %s) could not load the file to check its "
                    "tokenizer (%s); checked against slmforge's model of llama.cpp's tokenizer only",
                    WHERE, getattr(llama_cpp, "__version__", "?"), " ".join(str(e).split())[:200])
        return False
    try:
        result = measure(tokenizer, lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                         if text else [], texts)
    finally:
        llm.close()
    if result.differ:
        vocab = GgufVocab("", [], [], what=f"measured with llama.cpp {llama_cpp.__version__}")
        vocab.checked = result
        raise TokenizerRefused(refusal(tokenizer, vocab, None))
    return True
