"""Per-language quality rules: length, stop words, mean word length, symbol and digit ratios, repeated
lines and n-grams. Pure functions (no datatrove); the `quality` stage wraps `check`.

The rules follow Gopher (Rae et al. 2021, appendix A) in spirit, with thresholds per language: Hindi
words are short (है, के, में: two code points), Assamese and Bengali ones long (agglutination), German
compounds longer still, and a web sentence per line is a document too, so the minimum length is low.
Words are counted with `scripts.words`, which keeps Indic vowel signs inside their words.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections import Counter
from functools import lru_cache

from slmforge.curate.config import QualityThresholds
from slmforge.curate.scripts import words as split_words

# A few of the most frequent function words per language (our own short lists: enough to tell running
# text from menus, keyword lists, tables and code, which have none).
STOP_WORDS: dict[str, frozenset[str]] = {
    "hi": frozenset("के का की है में और को से पर यह भी एक नहीं तो था हैं लिए कि ने हो इस वह कर रहा गया".split()),
    "as": frozenset("আৰু এই হয় কৰা কৰে যে এটা হৈছে বাবে পৰা নাই কিন্তু তেওঁ এক সেই আছে হ'ল কথা মই ও".split()),
    "bn": frozenset("এবং এই হয় করে যে একটি থেকে জন্য না কিন্তু তিনি ও করা ছিল আর সে আমি তার হবে".split()),
    "en": frozenset("the and of to a in is that it for was on with as be are this by".split()),
    "de": frozenset("der die das und in zu den von mit ist sich des nicht ein eine auf für im dem als auch es".split()),
}

GENERIC = QualityThresholds(
    min_words=3, max_words=100_000, min_mean_word_length=2.0, max_mean_word_length=15.0,
    min_stop_words=1, max_symbol_ratio=0.1, max_digit_ratio=0.3, max_duplicate_line_fraction=0.3,
    max_top_2gram_fraction=0.2, max_duplicate_5gram_fraction=0.15)

# Only what differs from GENERIC. Mean word lengths are in code points (a Devanagari matra is one).
LANGUAGE_DEFAULTS: dict[str, dict[str, float | int]] = {
    "hi": {"min_mean_word_length": 1.8, "max_mean_word_length": 9.0},
    "as": {"min_mean_word_length": 2.5, "max_mean_word_length": 12.0},
    "bn": {"min_mean_word_length": 2.5, "max_mean_word_length": 12.0},
    "en": {"min_mean_word_length": 3.0, "max_mean_word_length": 10.0},
    "de": {"min_mean_word_length": 3.0, "max_mean_word_length": 12.0},
}

_SYMBOL_CHARS = frozenset("#*|~^_<>{}[]\\@=+")
# The n-gram repetition rules need some text to mean anything: in "The river is long and the water of
# the river is cold." one repeated 2-gram already covers 39% of the word characters.
REPETITION_MIN_WORDS = 20


def thresholds_for(lang: str, overrides: dict[str, QualityThresholds] | None = None) -> QualityThresholds:
    """GENERIC <- the language's defaults <- the user's fields for that language (None = not set)."""
    base = dataclasses.replace(GENERIC, **LANGUAGE_DEFAULTS.get(lang, {}))
    user = (overrides or {}).get(lang) or (overrides or {}).get("*")
    if user is not None:
        base = dataclasses.replace(base, **{f.name: getattr(user, f.name) for f in dataclasses.fields(user)
                                             if getattr(user, f.name) is not None})
    return base


def stop_words_for(lang: str, rules: QualityThresholds) -> frozenset[str]:
    if rules.stop_words is not None:
        return frozenset(w.casefold() for w in rules.stop_words)
    return STOP_WORDS.get(lang, frozenset())


def check(text: str, lang: str, rules: QualityThresholds, stop_words: frozenset[str] | None = None,
          tokens: list[str] | None = None) -> str | None:
    """The first rule `text` breaks, as a drop reason (e.g. "too_few_words"), or None to keep it.

    A threshold of 0 turns a minimum off; a ratio threshold of 1 (or more) turns a maximum off.
    """
    tokens = split_words(text) if tokens is None else tokens
    n = len(tokens)
    if n < rules.min_words:
        return "too_few_words"
    if rules.max_words and n > rules.max_words:
        return "too_many_words"
    if n:
        mean = sum(map(len, tokens)) / n
        if mean < rules.min_mean_word_length:
            return "short_words"
        if rules.max_mean_word_length and mean > rules.max_mean_word_length:
            return "long_words"
    stop = stop_words_for(lang, rules) if stop_words is None else stop_words
    if stop and rules.min_stop_words and sum(1 for w in tokens if w.casefold() in stop) < rules.min_stop_words:
        return "no_stop_words"
    chars = Counter(text)  # counted in C; then one look per distinct character
    dense = sum(n for c, n in chars.items() if not c.isspace())
    if dense:
        symbols = sum(n for c, n in chars.items() if _is_symbol(c))
        if rules.max_symbol_ratio < 1 and symbols / dense > rules.max_symbol_ratio:
            return "symbols"
        digits = sum(n for c, n in chars.items() if c.isdigit())
        if rules.max_digit_ratio < 1 and digits / dense > rules.max_digit_ratio:
            return "digits"
    if rules.max_duplicate_line_fraction < 1:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) >= 3 and duplicate_line_fraction(lines) > rules.max_duplicate_line_fraction:
            return "repeated_lines"
    if n < REPETITION_MIN_WORDS:
        return None
    folded = [w.casefold() for w in tokens]
    if rules.max_top_2gram_fraction < 1 and top_ngram_fraction(folded, 2) > rules.max_top_2gram_fraction:
        return "repeated_2gram"
    if rules.max_duplicate_5gram_fraction < 1 and duplicate_ngram_fraction(folded, 5) > rules.max_duplicate_5gram_fraction:
        return "repeated_5grams"
    return None


@lru_cache(maxsize=4096)
def _is_symbol(c: str) -> bool:
    return c in _SYMBOL_CHARS or unicodedata.category(c).startswith("S")


def duplicate_line_fraction(lines: list[str]) -> float:
    """Share of lines that repeat an earlier line of the same document."""
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(tokens: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (each occurrence), over all word characters."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, tokens))
    return sum(map(len, gram)) * count / total if total else 0.0


def duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    """Characters of words inside a word n-gram that occurs more than once, over all word characters."""
    starts = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(starts)
    covered = [False] * len(tokens)
    for i, gram in enumerate(starts):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    total = sum(map(len, tokens))
    return sum(len(w) for w, c in zip(tokens, covered) if c) / total if total else 0.0
