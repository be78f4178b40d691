"""Which writing systems a document uses, what its words are, and whether it is romanized Hindi.

Pure functions on strings (no datatrove), shared by the curate stages, the benchmark's plain loop and
the tests. Scripts are named by their ISO 15924 codes (`Deva`, `Beng`, `Latn`, ...).

Why not Python's `\\w` or `\\b`: Indic vowel signs and viramas are combining marks (category Mn/Mc),
which `re` does not count as word characters, so `\\bकम\\b` matches inside "कमी" and `\\bगंदी\\b` never
matches at all (its last letter, ी, is a mark). Words here are runs of letters, marks and digits.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections import Counter
from functools import lru_cache

import regex

# Letters, combining marks and digits, with an apostrophe inside a word kept (Assamese হ'ল, English don't).
WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:['’][\p{L}\p{M}\p{N}]+)*")
# What may not touch a matched word or phrase on either side, for block lists (see the module docstring).
WORD_CHAR_CLASS = r"[\p{L}\p{M}\p{N}_]"

# (first code point, last code point, script), sorted by start; letters and marks only are counted.
_RANGES = sorted([
    (0x0041, 0x024F, "Latn"), (0x1E00, 0x1EFF, "Latn"), (0x2C60, 0x2C7F, "Latn"), (0xA720, 0xA7FF, "Latn"),
    (0xFF21, 0xFF5A, "Latn"),
    (0x0370, 0x03FF, "Grek"), (0x1F00, 0x1FFF, "Grek"),
    (0x0400, 0x052F, "Cyrl"),
    (0x0530, 0x058F, "Armn"),
    (0x0590, 0x05FF, "Hebr"),
    (0x0600, 0x06FF, "Arab"), (0x0750, 0x077F, "Arab"), (0x08A0, 0x08FF, "Arab"), (0xFB50, 0xFDFF, "Arab"),
    (0xFE70, 0xFEFF, "Arab"),
    (0x0900, 0x097F, "Deva"), (0xA8E0, 0xA8FF, "Deva"), (0x1CD0, 0x1CFF, "Deva"),
    (0x0980, 0x09FF, "Beng"),
    (0x0A00, 0x0A7F, "Guru"), (0x0A80, 0x0AFF, "Gujr"), (0x0B00, 0x0B7F, "Orya"), (0x0B80, 0x0BFF, "Taml"),
    (0x0C00, 0x0C7F, "Telu"), (0x0C80, 0x0CFF, "Knda"), (0x0D00, 0x0D7F, "Mlym"), (0x0D80, 0x0DFF, "Sinh"),
    (0x0E00, 0x0E7F, "Thai"), (0x0E80, 0x0EFF, "Laoo"), (0x0F00, 0x0FFF, "Tibt"), (0x1000, 0x109F, "Mymr"),
    (0x10A0, 0x10FF, "Geor"), (0x1100, 0x11FF, "Hang"), (0xAC00, 0xD7AF, "Hang"), (0x3130, 0x318F, "Hang"),
    (0x1200, 0x139F, "Ethi"), (0x1780, 0x17FF, "Khmr"), (0x1C50, 0x1C7F, "Olck"), (0xABC0, 0xABFF, "Mtei"),
    (0x3040, 0x30FF, "Jpan"), (0x3400, 0x4DBF, "Hani"), (0x4E00, 0x9FFF, "Hani"), (0xF900, 0xFAFF, "Hani"),
])
_STARTS = [r[0] for r in _RANGES]

# Assamese writes /r/ and /w/ with its own letters ৰ and ৱ; Bengali uses র and ব. One ৰ or ৱ in a
# Bengali-script text is strong evidence of Assamese, as র dominating is of Bengali.
ASSAMESE_RA, ASSAMESE_WA, BENGALI_RA = "\u09f0", "\u09f1", "\u09b0"

# Frequent Hindi function words as typed in Latin letters (chat, comments, song lyrics). Words that
# are also common English ("to", "he", "main", "me", "the") are left out so English stays unflagged.
ROMANIZED_HINDI = frozenset("""
    hai hain nahi nahin nhi kya kyaa kyun kyon kaise kaisa aur mein mai bhi yeh ye woh wo tha thi
    raha rahi rahe gaya gayi karna karo karke kiya hoga hogi mujhe tujhe tum aap hum unka uska uski
    apna apni ka ki ke ko se liye lekin sab koi kuch jab tab abhi phir bahut accha acha bhai yaar
    matlab wala wali sirf agar toh hota hoti sakta sakte chahiye dekho bolo
""".split())


@lru_cache(maxsize=8192)
def char_script(ch: str) -> str | None:
    """The script of a letter or combining mark; None for digits, punctuation, spaces, symbols."""
    if not unicodedata.category(ch).startswith(("L", "M")):
        return None
    cp = ord(ch)
    i = bisect.bisect_right(_STARTS, cp) - 1
    if i >= 0 and _RANGES[i][0] <= cp <= _RANGES[i][1]:
        return _RANGES[i][2]
    return "Zyyy"  # another script (or a mark outside these blocks): counted, named "other"


def script_counts(text: str) -> tuple[Counter, Counter]:
    """(letters per script, counts of the characters that tell Assamese from Bengali)."""
    chars = Counter(text)  # counting in C first: a document has few distinct characters
    scripts: Counter = Counter()
    for ch, n in chars.items():
        script = char_script(ch)
        if script is not None:
            scripts[script] += n
    markers = Counter({k: chars.get(k, 0) for k in (ASSAMESE_RA, ASSAMESE_WA, BENGALI_RA)})
    return scripts, markers


def script_shares(text: str) -> dict[str, float]:
    """Share of the document's letters in each script, largest first (empty for a text without letters)."""
    scripts, _ = script_counts(text)
    total = sum(scripts.values())
    return {s: n / total for s, n in scripts.most_common()} if total else {}


def bengali_variant(markers: Counter) -> str | None:
    """'as' when Assamese letters (ৰ ৱ) outnumber Bengali র, 'bn' when র is there and they are not,
    None when neither occurs (too little text to tell by letters)."""
    assamese = markers[ASSAMESE_RA] + markers[ASSAMESE_WA]
    bengali = markers[BENGALI_RA]
    if assamese == 0 and bengali == 0:
        return None
    return "as" if assamese >= bengali else "bn"


def words(text: str) -> list[str]:
    """Words: runs of letters, combining marks and digits (an inner apostrophe kept)."""
    return WORD.findall(text)


def romanized_hindi_ratio(tokens: list[str]) -> float:
    """Share of words that are frequent Hindi function words written in Latin letters."""
    if not tokens:
        return 0.0
    return sum(1 for w in tokens if w.lower() in ROMANIZED_HINDI) / len(tokens)


def is_romanized_hindi(text: str, tokens: list[str] | None = None, min_ratio: float = 0.2,
                       min_words: int = 3) -> bool:
    """Mostly Latin letters and at least `min_ratio` of the words (and `min_words` of them) are
    Hindi function words: chat-style Hindi ("yeh kya hai bhai"), which a language-ID model trained
    on native scripts misreads as Hausa or Indonesian."""
    tokens = words(text) if tokens is None else tokens
    hits = sum(1 for w in tokens if w.lower() in ROMANIZED_HINDI)
    if hits < min_words or hits < min_ratio * len(tokens):
        return False
    shares = script_shares(text)
    return bool(shares) and next(iter(shares)) == "Latn"
