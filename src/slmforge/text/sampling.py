"""Bounded, seeded samples of a stream: reservoir sampling and a script-safe length cap.

Used for tokenizer training samples and for language-mixture draws: memory holds the sample,
never the corpus, however large it is.
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Callable, Iterable
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


def reservoir_sample(sources: Iterable[tuple[str, Iterable[str]]], budget: int, max_chars: int,
                     seed: int, say: Callable[[str], None] | None = None
                     ) -> tuple[list[str], dict[str, Any]]:
    """A uniform sample of at most `budget` lines over all sources, plus a record of it.

    `sources` yields (name, lines) pairs; kept lines are length-capped. Uses Li's Algorithm L
    (1994): instead of a random draw per line it jumps straight to the next line that enters the
    reservoir, so reading, not sampling, sets the pace. `say`, if given, hears about progress every
    million lines (a pass over a big corpus takes a while).
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []  # (source index, line)
    if budget <= 0:  # nothing to keep; still count what each source holds
        counts = [(name, sum(1 for _ in lines)) for name, lines in sources]
        return [], {"method": "reservoir", "seed": seed, "max_sentences": budget, "max_chars": max_chars,
                    "sentences": 0, "sources": [{"source": n, "lines": c, "sampled": 0, "truncated": 0}
                                                for n, c in counts]}
    names: list[str] = []
    seen: list[int] = []
    total = 0
    weight = math.exp(math.log(_uniform(rng)) / budget)
    next_pick = budget + _skip(rng, weight)  # 0-based index of the next line to take in

    for index, (name, lines) in enumerate(sources):
        names.append(name)
        count = 0
        for line in lines:
            if total < budget:
                reservoir.append((index, line))
            elif total == next_pick:
                reservoir[rng.randrange(budget)] = (index, line)
                weight *= math.exp(math.log(_uniform(rng)) / budget)
                next_pick += 1 + _skip(rng, weight)
            total += 1
            count += 1
            if say is not None and total % 1_000_000 == 0:
                say(f"sampling: read {total:,} lines ({name})")
        seen.append(count)

    sampled = [0] * len(names)
    cut = [0] * len(names)
    sentences = []
    for index, line in reservoir:
        text, was_cut = cap_length(line, max_chars)
        sentences.append(text)
        sampled[index] += 1
        cut[index] += was_cut
    record = {
        "method": "reservoir",
        "seed": seed,
        "max_sentences": budget,
        "max_chars": max_chars,
        "sentences": len(sentences),
        "sources": [{"source": n, "lines": s, "sampled": k, "truncated": c}
                    for n, s, k, c in zip(names, seen, sampled, cut)],
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
