"""Bounded, seeded samples of a stream: reservoir sampling and script-safe splitting of long lines.

Used for tokenizer training samples and for language-mixture draws: memory holds the sample,
never the corpus, however large it is.
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def cap_length(line: str, max_chars: int) -> tuple[str, bool]:
    """Cut `line` to at most `max_chars` characters, at the last space when there is one in the
    second half, and never inside a letter cluster. Returns (text, was_cut)."""
    if len(line) <= max_chars:
        return line, False
    cut = line[:max_chars]
    space = cut.rfind(" ")
    if space >= max_chars // 2:
        return cut[:space + 1], True
    end = max_chars
    # Cut before a whole cluster: not before a matra/nukta (it belongs to the letter before it),
    # nor after a virama or ZWJ/ZWNJ (they join that letter to the next one, as in क्ष).
    while end > 1 and (unicodedata.category(line[end])[0] == "M"
                       or unicodedata.combining(line[end - 1]) == 9  # 9: the virama class
                       or line[end - 1] in "\u200c\u200d"):
        end -= 1
    return line[:end], True


def split_long(text: str, max_chars: int) -> Iterator[str]:
    """`text` in pieces of at most `max_chars` characters whose concatenation is exactly `text`.

    Each cut falls right before the last space or newline in the second half of the window (where
    pre-tokenizers split anyway: the space starts the next word), else between letter clusters (as in
    `cap_length`). Works by index, so a 50 MB line costs one pass, not a copy per piece."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        low = start + max_chars // 2
        cut = max(text.rfind(" ", low, end + 1), text.rfind("\n", low, end + 1))
        if cut <= start:
            cut = end
            while cut > start + 1 and _inside_cluster(text, cut):
                cut -= 1
        yield text[start:cut]
        start = cut
    if start < n or n == 0:
        yield text[start:]


def _inside_cluster(text: str, i: int) -> bool:
    """True if a cut before text[i] would split a letter cluster: text[i] is a mark (matra, nukta),
    or text[i-1] is a virama or a zero-width (non-)joiner that binds it to text[i]."""
    return (unicodedata.category(text[i])[0] == "M" or unicodedata.combining(text[i - 1]) == 9
            or text[i - 1] in "\u200c\u200d")


def reservoir_sample(sources: Iterable[tuple[str, Iterable[str]]], budget: int, max_chars: int,
                     seed: int, say: Callable[[str], None] | None = None
                     ) -> tuple[list[str], dict[str, Any]]:
    """A uniform sample of at most `budget` sentences over all sources, plus a record of it.

    `sources` yields (name, lines) pairs. A line longer than `max_chars` is split into pieces of at most
    that length (`split_long`), each a sentence of its own, so a huge one-line file is learned from
    whole instead of from its first few KB (the record counts such lines as `split`). Uses Li's
    Algorithm L (1994): instead of a random draw per sentence it jumps straight to the next one that
    enters the reservoir, so reading, not sampling, sets the pace. `say`, if given, hears about
    progress every million lines (a pass over a big corpus takes a while).
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []  # (source index, sentence)
    names: list[str] = []
    seen: list[int] = []
    units: list[int] = []
    split: list[int] = []
    total = 0  # sentences seen so far, over all sources
    lines_read = 0
    weight = math.exp(math.log(_uniform(rng)) / budget) if budget > 0 else 0.0
    next_pick = budget + _skip(rng, weight) if budget > 0 else -1  # 0-based index of the next one taken in

    for index, (name, lines) in enumerate(sources):
        names.append(name)
        count = pieces = cut = 0
        for line in lines:
            count += 1
            lines_read += 1
            parts = split_long(line, max_chars) if len(line) > max_chars else (line,)
            cut += len(line) > max_chars
            for part in parts:
                if total < budget:
                    reservoir.append((index, part))
                elif total == next_pick:
                    reservoir[rng.randrange(budget)] = (index, part)
                    weight *= math.exp(math.log(_uniform(rng)) / budget)
                    next_pick += 1 + _skip(rng, weight)
                total += 1
                pieces += 1
            if say is not None and lines_read % 1_000_000 == 0:
                say(f"sampling: read {lines_read:,} lines ({name})")
        seen.append(count)
        units.append(pieces)
        split.append(cut)

    sampled = [0] * len(names)
    sentences = []
    for index, text in reservoir:
        sentences.append(text)
        sampled[index] += 1
    record = {
        "method": "reservoir",
        "seed": seed,
        "max_sentences": budget,
        "max_chars": max_chars,
        "sentences": len(sentences),
        "sources": [{"source": n, "lines": s, "sentences": u, "sampled": k, "split": c}
                    for n, s, u, k, c in zip(names, seen, units, sampled, split)],
    }
    return sentences, record


def _uniform(rng: random.Random) -> float:
    return rng.random() or 1e-300  # log(0) guard; random() is in [0, 1)


def _skip(rng: random.Random, weight: float) -> int:
    """Lines to pass over before the next one enters the reservoir (Algorithm L)."""
    if weight >= 1.0:
        return 0
    if weight <= 0.0:
        return 2**62  # the reservoir is as good as final
    return int(math.log(_uniform(rng)) / math.log1p(-weight))
