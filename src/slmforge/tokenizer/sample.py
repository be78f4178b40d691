"""The training sample: a bounded, seeded, recorded set of sentences streamed from the corpus.

The `tokenizers` trainers hold every sentence (and its word counts) in memory and are known to
run out of memory on tens of GB and to overflow on single huge "sentences". So the trainer only
ever sees `max_sentences` lines of at most `max_chars` characters, drawn uniformly by reservoir
sampling (Vitter's algorithm R) while the files stream past: memory is bounded by the budget, not
by the corpus. A sentence is a line and keeps its line ending, so newlines get learned as tokens.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slmforge.errors import SlmforgeError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def cap_length(line: str, max_chars: int) -> tuple[str, bool]:
    """Cut `line` to at most `max_chars` characters, at the last space when there is one in the
    second half, and never between a letter and its combining marks. Returns (text, was_cut)."""
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


def list_files(path: str) -> list[Path]:
    """`path` itself, or the .txt/.jsonl(.gz) files under a folder, sorted for determinism."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise SlmforgeError(f"{p}: training input not found")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise SlmforgeError(f"{p}: no {'/'.join(SUFFIXES)} files in this folder")
    return files


def iter_lines(path: Path, text_field: str = "text") -> Iterator[str]:
    """Non-blank lines of a .txt file, or of the `text_field` of each .jsonl record."""
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            for number, raw in enumerate(f, 1):
                if is_jsonl:
                    if not raw.strip():
                        continue
                    text = _jsonl_text(raw, text_field, path, number)
                    lines = text.splitlines(keepends=True)
                else:
                    lines = [raw]
                for line in lines:
                    if line.strip():
                        yield line
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: not UTF-8 near line {number + 1} ({e.reason}); convert it, "
                            f"e.g. `iconv -f LATIN1 -t UTF-8`") from None
    except (OSError, EOFError) as e:
        raise SlmforgeError(f"{path}: cannot read ({e})") from None


def _jsonl_text(raw: str, text_field: str, path: Path, number: int) -> str:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SlmforgeError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise SlmforgeError(f"{path}:{number}: no string field {text_field!r} "
                            f"(set tokenizer.text_field)")
    return text


def reservoir_sample(sources: Iterable[tuple[str, Iterable[str]]], budget: int, max_chars: int,
                     seed: int) -> tuple[list[str], dict[str, Any]]:
    """A uniform sample of at most `budget` lines over all sources, plus a record of it.

    `sources` yields (name, lines) pairs; each line is length-capped before sampling.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []  # (source index, line)
    names: list[str] = []
    seen: list[int] = []
    cut: list[int] = []
    total = 0
    for index, (name, lines) in enumerate(sources):
        names.append(name)
        seen.append(0)
        cut.append(0)
        for line in lines:
            text, was_cut = cap_length(line, max_chars)
            seen[index] += 1
            cut[index] += was_cut
            total += 1
            if len(reservoir) < budget:
                reservoir.append((index, text))
            else:
                j = rng.randrange(total)
                if j < budget:
                    reservoir[j] = (index, text)
    sampled = [0] * len(names)
    for index, _ in reservoir:
        sampled[index] += 1
    record = {
        "method": "reservoir",
        "seed": seed,
        "max_sentences": budget,
        "max_chars": max_chars,
        "sentences": len(reservoir),
        "sources": [{"source": n, "lines": s, "sampled": k, "truncated": c}
                    for n, s, k, c in zip(names, seen, sampled, cut)],
    }
    return [text for _, text in reservoir], record


def sample_inputs(inputs: list[str], text_field: str, budget: int, max_chars: int,
                  seed: int) -> tuple[list[str], dict[str, Any]]:
    """Reservoir-sample lines from files/folders; one record entry per file."""
    files = [f for path in inputs for f in list_files(path)]
    return reservoir_sample(((str(f), iter_lines(f, text_field)) for f in files),
                            budget, max_chars, seed)
