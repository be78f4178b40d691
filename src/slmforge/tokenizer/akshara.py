"""Akshara-aware tokenizers: an akshara (grapheme cluster) is never split across tokens.

An akshara is a base character with the combining marks after it (vowel signs, virama, nukta,
anusvara, ZWJ/ZWNJ), and, in Devanagari, Bengali-Assamese, Gujarati, Oriya, Telugu and Malayalam,
consonants joined by a virama into a conjunct: `क्ष`, `त्रि`, `स्त्री`, `ক্ষ্ম`. These are Unicode's
extended grapheme clusters with the conjunct rule of Unicode 15.1 (GB9c); a mark that follows a space
or a digit stays with it, as Unicode says.

Plain BPE and Unigram learn tokens such as `ौरव` or `ों` that start with a vowel sign. With
`tokenizer.akshara = true` we train on text in which every frequent multi-character akshara is one
private-use character, so the trainer can only learn whole aksharas and their concatenations, then
spell the result back:

- BPE: the vocabulary gets each akshara and the pieces it is built from, and the merge list starts
  with merges that assemble every known akshara (marks onto their base, then the parts of a conjunct
  left to right, with a merge for every way the parts can meet). They rank before every learned
  merge, so an akshara in the vocabulary is always whole before anything joins it to a neighbour.
- Unigram: the pieces are whole aksharas and their concatenations, plus the marks alone at the score
  of an unknown character (for aksharas too rare to learn), so Viterbi cuts a vowel sign from its
  consonant only where it would otherwise have taken the unknown token; a conjunct can still be
  cut where a virama meets a consonant, if both halves are pieces of their own.

The result is a plain `tokenizer.json` (BPE or Unigram with byte fallback) that `AutoTokenizer` loads
with the same ids. Aksharas seen fewer than `min_frequency` times in the sample, or beyond the budget
(at most half of the learnable vocabulary goes to aksharas and their parts), are not learned: they
are spelled with smaller pieces or byte tokens, like any unseen character.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, models, trainers
from tokenizers import Tokenizer as BackendTokenizer

from slmforge.errors import SlmforgeError

ZWNJ, ZWJ = "\u200c", "\u200d"
# Unicode 15.1 DerivedCoreProperties.txt, Indic_Conjunct_Break: the viramas that join consonants
# (InCB=Linker) and the consonants they join (InCB=Consonant), in the six scripts the rule covers.
LINKERS = "\u094d\u09cd\u0acd\u0b4d\u0c4d\u0d4d"
CONSONANTS = ("\u0915-\u0939\u0958-\u095f\u0978-\u097f"                              # Devanagari
              "\u0995-\u09a8\u09aa-\u09b0\u09b2\u09b6-\u09b9\u09dc\u09dd\u09df\u09f0\u09f1"  # Bengali
              "\u0a95-\u0aa8\u0aaa-\u0ab0\u0ab2\u0ab3\u0ab5-\u0ab9\u0af9"              # Gujarati
              "\u0b15-\u0b28\u0b2a-\u0b30\u0b32\u0b33\u0b35-\u0b39\u0b5c\u0b5d\u0b5f\u0b71"  # Oriya
              "\u0c15-\u0c28\u0c2a-\u0c39\u0c58-\u0c5a"                              # Telugu
              "\u0d15-\u0d3a")                                                     # Malayalam
PRIVATE_USE = 0xF0000  # Supplementary Private Use Area-A: one code point per learned akshara


@functools.lru_cache(maxsize=None)
def _patterns() -> tuple[re.Pattern, re.Pattern]:
    """(akshara, unit) regexes. A unit is one base character and its marks; an akshara is one or more
    units, joined where a virama (and marks or ZWJ, not ZWNJ) meets a consonant."""
    marks = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)) in ("Mn", "Mc", "Me"):
            if marks and marks[-1][1] == cp - 1:
                marks[-1][1] = cp
            else:
                marks.append([cp, cp])
    mark = "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in marks)
    extend = f"[{mark}{ZWJ}{ZWNJ}]"
    joining = f"[{mark}{ZWJ}]"
    akshara = rf"(?:[{CONSONANTS}](?:{joining}*?[{LINKERS}]{joining}*[{CONSONANTS}])*|.){extend}*"
    return re.compile(akshara, re.S), re.compile(rf".{extend}*", re.S)


def aksharas(text: str) -> list[str]:
    """`text` cut into aksharas: "क्षत्रिय" -> ["क्ष", "त्रि", "य"]; "".join(result) == text."""
    return _patterns()[0].findall(text)


def akshara_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the aksharas of `text`."""
    return [m.span() for m in _patterns()[0].finditer(text)]


def units(akshara: str) -> list[str]:
    """An akshara's base characters with their marks: "स्त्री" -> ["स्", "त्", "री"]."""
    return _patterns()[1].findall(akshara)


def split_words(text: str, offsets: list[tuple[int, int]]) -> set[str]:
    """The whitespace-separated words of `text` in which a token starts inside an akshara, or inside a
    character (byte tokens), given the tokens' (start, end) character offsets into `text`."""
    starts = {a for a, _ in akshara_spans(text)}
    cuts = []  # positions where a token starts in the middle of an akshara or of a character
    prev_end = None
    for start, end in offsets:
        if end <= start:  # special tokens and empty pieces cover no text
            continue
        if prev_end is not None and (start < prev_end or start not in starts):
            cuts.append(start)  # start < prev_end: shares a character with the previous token
        prev_end = end
    return {m.group() for m in re.finditer(r"\S+", text) if any(m.start() <= c < m.end() for c in cuts)}


# ---------------------------------------------------------------- training


def parts(akshara: str) -> list[str]:
    """The multi-character pieces that assemble `akshara`: each unit's prefixes, then the akshara's
    prefixes at unit boundaries ("स्त्री": स्, त्, री, स्त्, स्त्री)."""
    us = units(akshara)
    pieces = [u[:k] for u in us for k in range(2, len(u) + 1)]
    pieces += ["".join(us[:k]) for k in range(2, len(us) + 1)]
    return list(dict.fromkeys(pieces))


def select(texts: Iterable[str], min_frequency: int, budget: int, alphabet: set[str]) -> list[str]:
    """The multi-character aksharas to learn whole, most frequent first: seen at least `min_frequency`
    times, starting with a letter, made of `alphabet` characters, while their parts fit in `budget`."""
    counts = Counter(a for text in texts for a in aksharas(text) if len(a) > 1)
    chosen, pieces = [], set()
    for akshara, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if count < min_frequency:
            break
        if not unicodedata.category(akshara[0]).startswith("L") or not set(akshara) <= alphabet:
            continue  # a mark after a space, digit or symbol: stray, not an akshara to learn
        new = [p for p in parts(akshara) if p not in pieces]
        if len(pieces) + len(new) > budget:
            break
        chosen.append(akshara)
        pieces.update(new)
    return chosen


def assembly_merges(chosen: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build every chosen akshara from its characters, in the order they must rank.

    First each unit: marks join their base one by one (no two of these can compete: only a unit's
    first character is not a mark). Then the units of a conjunct, left to right; merges of other
    aksharas may already have joined some later units (त् + री of त्री inside स्त्री), so for every
    prefix there is a merge with every piece that can follow it, and the akshara always completes.
    """
    pieces = {p for a in chosen for p in parts(a)}
    unit_merges, join_merges = [], []
    for akshara in chosen:
        us = units(akshara)
        unit_merges += [(u[:k], u[k]) for u in us for k in range(1, len(u))]
        for i in range(1, len(us)):
            left = "".join(us[:i])
            for j in range(i + 1, len(us) + 1):
                right = "".join(us[i:j])
                if j == i + 1 or right in pieces:
                    join_merges.append((left, right))
    return list(dict.fromkeys(unit_merges + join_merges))


def private_use_symbols(chosen: list[str], texts: list[str]) -> dict[str, str]:
    """akshara -> a private-use character that does not occur in `texts`."""
    used = {c for text in texts for c in text if ord(c) >= PRIVATE_USE}
    free = (chr(cp) for cp in range(PRIVATE_USE, 0x10FFFE) if chr(cp) not in used
            and unicodedata.category(chr(cp)) == "Co")
    try:
        return {akshara: next(free) for akshara in chosen}
    except StopIteration:
        raise SlmforgeError("tokenizer.akshara: the training text uses up the private-use planes "
                            "that akshara training needs") from None


def spell(text: str, symbols: dict[str, str]) -> str:
    """`text` with each chosen akshara as its symbol; other multi-character aksharas become a line
    break, so that the trainer never sees their characters loose (and learns no token that starts
    with a mark)."""
    return "".join(symbols.get(a, a if len(a) == 1 else "\n") for a in aksharas(text))


def _learned(backend: BackendTokenizer) -> dict:
    return json.loads(backend.to_str())["model"]


def train_bpe(texts: list[str], chars: list[str], specials: list[AddedToken], unk: str | None,
              vocab_size: int, min_frequency: int, max_token_chars: int, pre_tokenizer,
              show_progress: bool = False) -> BackendTokenizer:
    """BPE over normalized `texts` in which no known akshara is ever split (no byte tokens yet:
    `vocab_size` excludes them). `chars`: the character alphabet; `pre_tokenizer`: the one used for
    training, which must count private-use characters as letters."""
    room = vocab_size - len(specials) - len(chars)
    chosen = select(texts, min_frequency, room // 2, set(chars))
    symbols = private_use_symbols(chosen, texts)
    merges = assembly_merges(chosen)
    fixed = list(dict.fromkeys([t.content for t in specials] + chars + [a + b for a, b in merges]))
    learn = vocab_size - len(fixed)
    if learn <= 0:
        raise SlmforgeError(f"tokenizer.vocab_size: {vocab_size + 256} leaves no room for learned tokens "
                            f"with akshara = true ({len(fixed)} ids for special tokens, characters and "
                            f"aksharas)")
    alphabet = chars + list(symbols.values())
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + learn, min_frequency=min_frequency,
        special_tokens=specials, max_token_length=max_token_chars, show_progress=show_progress,
        initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    spelled = BackendTokenizer(models.BPE(unk_token=unk))
    spelled.pre_tokenizer = pre_tokenizer
    spelled.train_from_iterator([spell(t, symbols) for t in texts], trainer, length=len(texts))
    learned = _learned(spelled)
    back = {s: a for a, s in symbols.items()}

    def unspell(token: str) -> str:
        return "".join(back.get(c, c) for c in token)

    ordered = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    tokens = list(dict.fromkeys(fixed + [unspell(t) for t, _ in ordered]))
    merges += [(unspell(a), unspell(b)) for a, b in learned["merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab, list(dict.fromkeys(merges)), unk_token=unk))
    backend.add_special_tokens(specials)  # as the trainer registers them: matched in text, skipped in decode
    return backend


def train_unigram(texts: list[str], specials: list[AddedToken], unk: str, vocab_size: int,
                  min_frequency: int, max_token_chars: int, pre_tokenizer,
                  show_progress: bool = False) -> BackendTokenizer:
    """Unigram over normalized `texts` whose pieces are whole aksharas and their concatenations, plus
    the characters found only inside aksharas (vowel signs, virama, ...) at the score of an unknown
    character: an akshara too rare to learn is spelled in characters rather than bytes, and Viterbi
    takes such a piece only where it would otherwise have taken the unknown token."""
    alphabet = {c for text in texts for c in text}
    chosen = select(texts, min_frequency, (vocab_size - len(specials)) // 2, alphabet)
    symbols = private_use_symbols(chosen, texts)
    spelled_texts = [spell(t, symbols) for t in texts]
    inner = sorted(alphabet - {c for text in spelled_texts for c in text})
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(inner), special_tokens=specials, unk_token=unk,
        max_piece_length=max_token_chars, initial_alphabet=["\n"], show_progress=show_progress)
    spelled = BackendTokenizer(models.Unigram())
    spelled.pre_tokenizer = pre_tokenizer
    spelled.train_from_iterator(spelled_texts, trainer, length=len(texts))
    learned = _learned(spelled)
    back = {s: a for a, s in symbols.items()}
    pieces: dict[str, float] = {}
    for piece, score in learned["vocab"]:
        pieces.setdefault("".join(back.get(c, c) for c in piece), score)
    # tokenizers scores an unknown character min(score) - 10 (kUnkPenalty, as SentencePiece does).
    unknown_score = min(pieces.values()) - 10.0
    for char in inner:
        pieces.setdefault(char, unknown_score)
    backend = BackendTokenizer(models.Unigram(list(pieces.items()), unk_id=list(pieces).index(unk)))
    backend.add_special_tokens(specials)
    return backend
