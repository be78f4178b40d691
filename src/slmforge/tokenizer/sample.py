"""The training sample: a bounded, seeded, recorded set of sentences streamed from the corpus.

The `tokenizers` trainers hold every sentence (and its word counts) in memory and are known to
run out of memory on tens of GB and to overflow on single huge "sentences". So the trainer only
ever sees `max_sentences` lines of at most `max_chars` characters, drawn uniformly by reservoir
sampling while the files stream past: memory is bounded by the budget, not by the corpus. Files are read by `slmforge.text.sources` (text, JSONL, Parquet, .gz, .zst), one
line of text = one sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from slmforge.text.sampling import reservoir_sample
from slmforge.text.sources import ReadStats, SourceConfig, SourceReader
from slmforge.errors import SlmforgeError

log = logging.getLogger(__name__)


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


def warn_about_training(cfg: Any, record: dict[str, Any], vocab_size: int) -> list[str]:
    """Log (and return) what a user should know about a finished training: lines split because they
    exceeded `max_chars`, and a vocabulary smaller than asked because the sample supports no more."""
    warnings = []
    split = sum(int(s.get("split", 0)) for s in record.get("sources", []))
    if split:
        worst = ", ".join(str(s.get("source", s.get("path"))) for s in record["sources"] if s.get("split"))
        warnings.append(f"{split:,} line(s) longer than tokenizer.max_chars={cfg.max_chars:,} characters were "
                        f"split into pieces of at most that length ({worst}); is the text one line per "
                        f"sentence or paragraph?")
    if vocab_size < cfg.vocab_size:
        sentences = record.get("sentences", record.get("drawn", 0))
        more = "more text"
        if sentences >= cfg.max_sentences:
            more += f" (raise tokenizer.max_sentences={cfg.max_sentences:,})"
        if cfg.min_frequency > 1:
            more += f" or a lower tokenizer.min_frequency (now {cfg.min_frequency})"
        warnings.append(f"tokenizer.vocab_size: asked for {cfg.vocab_size:,} ids, got {vocab_size:,}: the "
                        f"{sentences:,}-sentence sample supports no more; the model will use {vocab_size:,}. "
                        f"For the size asked, give it {more}")
    for warning in warnings:
        log.warning(warning)
    return warnings
