"""Normalizer, pre-tokenizer and decoder pipelines that keep every script's words whole.

The GPT-2/GPT-4 split regexes match words with `\\p{L}+`. Indic vowel signs (matras), virama,
nukta and anusvara are combining marks (`\\p{M}`), not letters, so `\\p{L}+` cuts `हिन्दी` into
`ह`, `ि`, `न`, ... and every sign becomes a piece of its own. Our word class is letters *and* marks,
plus ZWJ/ZWNJ (U+200D/U+200C), which Bengali-Assamese and Devanagari use inside words for
conjunct shapes (`র‍্য`). BERT's `strip_accents` would delete the virama, nukta and several matras
outright (`हिन्दी` -> `हिनदी`); we never use it.
"""

from __future__ import annotations

import unicodedata

from tokenizers import Regex, decoders, normalizers, pre_tokenizers

# Letters, combining marks, ZWNJ, ZWJ: one word, whatever the script.
WORD = r"[\p{L}\p{M}\x{200C}\x{200D}]+"
NOT_WORD = r"[^\s\p{L}\p{M}\p{N}\x{200C}\x{200D}]"


def split_pattern(split_digits: bool, private_use: bool = False) -> str:
    """GPT-4-style split (leading space kept with the word, newlines grouped), letters+marks aware.
    `private_use`: private-use characters count as letters (akshara training spells aksharas so)."""
    number = r"\p{N}" if split_digits else r"\p{N}{1,3}"
    word, not_word = (WORD.replace("]", r"\p{Co}]"), NOT_WORD.replace("]", r"\p{Co}]")) if private_use \
        else (WORD, NOT_WORD)
    return (rf" ?{word}"                 # a word with its leading space
            rf"| ?{number}"              # digits (Devanagari ०-९ and Bengali ০-৯ are \p{{N}} too)
            rf"| ?{not_word}+[\r\n]*"    # a run of punctuation/symbols/emoji, e.g. '।\n'
            r"|\s*[\r\n]+"               # newlines with the spaces before them
            r"|\s+(?!\S)"                # spaces before spaces: the last one joins the next word
            r"|\s+")


def wordpiece_pattern(split_digits: bool) -> str:
    """BERT-style: whitespace already removed; words whole, each punctuation mark alone."""
    number = r"\p{N}" if split_digits else r"\p{N}+"
    return rf"{WORD}|{number}|{NOT_WORD}"


def normalizer(normalization: str, lowercase: bool) -> normalizers.Normalizer | None:
    """NFC/NFKC then optional lowercasing. `Lowercase` maps case only: marks stay."""
    steps = {"none": [], "nfc": [normalizers.NFC()], "nfkc": [normalizers.NFKC()]}[normalization]
    if lowercase:
        steps.append(normalizers.Lowercase())
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else normalizers.Sequence(steps)


def pre_tokenizer(kind: str, split_digits: bool, private_use: bool = False) -> pre_tokenizers.PreTokenizer:
    if kind == "wordpiece":
        return pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(wordpiece_pattern(split_digits)), behavior="isolated"),
        ])
    split = pre_tokenizers.Split(Regex(split_pattern(split_digits, private_use)), behavior="isolated")
    if kind == "bytelevel":
        # use_regex=False: ByteLevel's built-in GPT-2 regex is the `\p{L}+` one that breaks matras.
        return pre_tokenizers.Sequence([
            split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return split


def decoder(kind: str) -> decoders.Decoder:
    if kind == "bytelevel":
        return decoders.ByteLevel()
    if kind == "wordpiece":
        # cleanup=False: BERT's cleanup also rewrites " ." and " n't", which is not in the text.
        return decoders.WordPiece(prefix="##", cleanup=False)
    # Spaces live inside the tokens (no '▁' stand-in), so the text is the tokens joined, with
    # <0xNN> runs turned back into the UTF-8 characters they spell.
    return decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])


# Marks of four scripts: Devanagari matras/virama/nukta, Bengali-Assamese signs, Latin accents.
MARK_PROBE = "हिन्दी ज़मीन অসমীয়া ভাষা Grüße café"


def strips_marks(norm: normalizers.Normalizer | None) -> bool:
    """True when `norm` deletes combining marks (e.g. BERT uncased: `strip_accents`)."""
    if norm is None:
        return False
    out = norm.normalize_str(MARK_PROBE)
    return count_marks(out) < count_marks(MARK_PROBE)


def count_marks(text: str) -> int:
    return sum(unicodedata.category(c).startswith("M") for c in unicodedata.normalize("NFD", text))
