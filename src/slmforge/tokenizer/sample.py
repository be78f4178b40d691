"""The training sample: a bounded, seeded, recorded set of sentences streamed from the corpus.

The `tokenizers` trainers hold every sentence (and its word counts) in memory and are known to
run out of memory on tens of GB and to overflow on single huge "sentences". So the trainer only
ever sees `max_sentences` lines of at most `max_chars` characters, drawn uniformly by reservoir
sampling while the files stream past: memory is bounded by the budget, not by the corpus. Files are read by `slmforge.data.sources` (text, JSONL, Parquet, .gz, .zst), one
line of text = one sentence.
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from slmforge.data.sources import ReadStats, SourceConfig, SourceReader
from slmforge.errors import SlmforgeError


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


def strict_lines(source: SourceConfig, stats: ReadStats | None = None) -> Iterator[str]:
    """The source's lines, stopping with an error naming file and line at the first line that is
    not UTF-8 (the data reader counts and skips those; a tokenizer must not quietly learn from a
    Latin-1 file with every umlaut line missing). Other skips (empty lines, broken JSON) are
    counted in `stats`."""
    reader = SourceReader(source, stats)
    for text in reader:
        _check_utf8(reader)
        yield text
    _check_utf8(reader)


def _check_utf8(reader: SourceReader) -> None:
    if not reader.stats.skipped.get("invalid_utf8"):
        return
    for name, entry in reader.stats.files.items():
        bad = entry["skipped"].get("invalid_utf8")
        if bad:
            raise SlmforgeError(f"{name}:{bad['first_line']}: not UTF-8; convert the file "
                                f"(e.g. `iconv -f LATIN1 -t UTF-8`) or remove it from the inputs")


def sample_inputs(inputs: list[str], text_field: str, budget: int, max_chars: int, seed: int,
                  say: Callable[[str], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Reservoir-sample lines from files/folders (one record entry per input, with its skips)."""
    sources = [SourceConfig(path=path, text_field=text_field) for path in inputs]
    stats = [ReadStats() for _ in sources]
    sentences, record = reservoir_sample(
        ((s.path, strict_lines(s, st)) for s, st in zip(sources, stats)), budget, max_chars, seed, say)
    for entry, st in zip(record["sources"], stats):
        entry["skipped"] = dict(st.skipped)
    return sentences, record


def check_mixture_record(record: dict[str, Any]) -> None:
    """The mixture sampler skips non-UTF-8 lines; for a tokenizer that is an input error."""
    for source in record.get("sources", []):
        if source.get("skipped", {}).get("invalid_utf8"):
            raise SlmforgeError(f"{source.get('path')}: {source['skipped']['invalid_utf8']} line(s) "
                                f"are not UTF-8; convert the file (e.g. `iconv -f LATIN1 -t UTF-8`)")
