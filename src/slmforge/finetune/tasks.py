"""Infilling examples made from any plain corpus (seed 000 made its own), as JSONL for `finetune`:

    fim      {"prefix": ..., "suffix": ..., "middle": ...}       fill-in-the-middle (finetune.task = "fim")
    blanks   {"prompt": "... ____ ... ____ ...", "response": "span 1\\nspan 2"}   masked spans in,
             spans out (finetune.task = "chat"), as seed 000 did

Spans are whole words (split on whitespace, so Devanagari and Bengali words stay whole with their
matras); choices depend only on (seed, document number), so the same command writes the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from slmforge.errors import SlmforgeError
from slmforge.fileio import write_text_atomic
from slmforge.formatting import say
from slmforge.text.sources import documents_of

BLANK = "____"


@dataclass
class InfillConfig:
    style: str = "fim"
    """fim or blanks."""
    min_words: int = 6
    """Documents with fewer words are left out (too little context)."""
    span_words: int = 4
    """Mean span length in words (spans are 1 to 2x this)."""
    spans: int = 2
    """Spans blanked per document (blanks style)."""
    seed: int = 0
    limit: int = 0
    """Examples to write at most (0 = one per usable document)."""


def infill_examples(documents: Iterator[str], cfg: InfillConfig) -> Iterator[dict[str, str]]:
    made = 0
    for number, text in enumerate(documents):
        words = text.split()
        if len(words) < cfg.min_words:
            continue
        rng = np.random.default_rng([cfg.seed, number])
        if cfg.style == "fim":
            yield _fim(words, rng, cfg)
        else:
            yield _blanks(words, rng, cfg)
        made += 1
        if cfg.limit and made >= cfg.limit:
            return


def _span(rng: np.random.Generator, words: int, mean: int, start_min: int, end_max: int) -> tuple[int, int]:
    length = int(min(rng.integers(1, 2 * mean + 1), max(1, end_max - start_min - 1)))
    start = int(rng.integers(start_min, max(start_min + 1, end_max - length + 1)))
    return start, start + length


def _fim(words: list[str], rng: np.random.Generator, cfg: InfillConfig) -> dict[str, str]:
    # Keep at least one word of context on each side.
    start, end = _span(rng, len(words), cfg.span_words, 1, len(words) - 1)
    prefix = " ".join(words[:start]) + " "
    return {"prefix": prefix, "suffix": " " + " ".join(words[end:]), "middle": " ".join(words[start:end])}


def _blanks(words: list[str], rng: np.random.Generator, cfg: InfillConfig) -> dict[str, str]:
    # Spans in disjoint slices of the document, in order, so blanks and answers line up.
    bounds = np.linspace(0, len(words), cfg.spans + 1).astype(int)
    out, answers, at = [], [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue
        start, end = _span(rng, len(words), cfg.span_words, int(lo), int(hi))
        out += words[at:start] + [BLANK]
        answers.append(" ".join(words[start:end]))
        at = end
    out += words[at:]
    return {"prompt": "Fill in the blanks: " + " ".join(out), "response": "\n".join(answers)}


def write_infill_file(inputs: list[str], out: str | Path, cfg: InfillConfig) -> int:
    """Write examples from `inputs` (text, JSONL or Parquet sources) to `out`; returns how many."""
    if cfg.style not in ("fim", "blanks"):
        raise SlmforgeError(f"--style: must be fim or blanks, got {cfg.style!r}")
    if cfg.min_words < 3 or cfg.span_words < 1 or cfg.spans < 1:
        raise SlmforgeError("--min-words must be >= 3, --span-words and --spans >= 1")

    lines = [json.dumps(e, ensure_ascii=False) + "\n" for e in infill_examples(documents_of(inputs, say), cfg)]
    if not lines:
        raise SlmforgeError(f"{', '.join(inputs)}: no document has {cfg.min_words} words or more")
    write_text_atomic(out, "".join(lines))
    return len(lines)
