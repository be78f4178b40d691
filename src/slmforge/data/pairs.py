"""`slmforge data pairs`: parallel text in, clean train/val/test pair files out.

Sources are JSONL (`{"src": ..., "tgt": ...}`, field names configurable; .gz/.zst allowed), TSV (source
TAB target), two aligned text files (`path` holds the sources, `tgt_path` the targets, line for line)
or `plone:LOCALE`, the human translations of the Plone CMS that ship in `plone.app.locales` (English
-> LOCALE; `swap = true` turns them round). Every pair goes through, in order:

    empty        either side blank after trimming                        dropped, counted
    too short    a side under min_length (words or characters)          dropped, counted
    too long     a side over max_length                                  dropped, counted
    ratio        longer side / shorter side above max_ratio              dropped, counted
    duplicate    the same (source, target) again, whitespace aside       dropped, counted

then the survivors are shuffled by the seed and split into test, val and train; a train or val pair
whose source is also a test source is dropped too ("source in test"), so the test set measures
sentences the model never saw. Structural faults (not UTF-8, invalid JSON, a missing field, a TSV line
without exactly one tab, aligned files of different lengths) stop with one line naming the file and
line, unless on_bad_line = "skip" counts them instead.

Output, in `out`: train.jsonl, val.jsonl, test.jsonl ({"src", "tgt"} per line: what `slmforge finetune`
with finetune.task = "translate" reads by default) and report.json with every count. All are written
to temporary names first and renamed at the end, so a failed run leaves no half-written set.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.fileio import write_files_atomic
from slmforge.formatting import say

SECTION = "pairs"
PLONE = "plone:"
SPLITS = ("train", "val", "test")


@dataclass
class PairSourceConfig:
    """One source of pairs."""

    path: str = ""
    """JSONL or TSV file (.gz/.zst allowed), the source side of two aligned text files, or plone:LOCALE."""
    tgt_path: str = ""
    """Aligned text files: the file of targets, line for line with `path`."""
    format: Literal["auto", "jsonl", "tsv"] = "auto"
    """auto: .jsonl/.json/.ndjson are JSONL, anything else TSV (or aligned text with tgt_path)."""
    src_field: str = "src"
    """JSONL: the field holding the source sentence."""
    tgt_field: str = "tgt"
    """JSONL: the field holding the target sentence."""
    swap: bool = False
    """Exchange source and target (plone:de gives English -> German; swap for German -> English)."""

    def validate(self) -> None:
        require(bool(self.path), "path", "required: a pair file, a source-side file or plone:LOCALE")
        require(not (self.tgt_path and self.path.startswith(PLONE)), "tgt_path", "does not apply to plone: sources")
        require(bool(self.src_field) and bool(self.tgt_field), "src_field", "field names must not be empty")


@dataclass
class PairsConfig:
    """[pairs]: parallel sources, filters and the held-out splits of `slmforge data pairs`."""

    inputs: list[PairSourceConfig] = field(default_factory=list)
    """Sources of pairs, read in order (each {path, tgt_path, format, src_field, tgt_field, swap})."""
    out: str = ""
    """Folder for train.jsonl, val.jsonl, test.jsonl and report.json."""
    length_unit: Literal["words", "chars"] = "words"
    """What min_length, max_length and max_ratio count: whitespace-separated words, or characters
    (for text without spaces between words)."""
    min_length: int = 1
    """Shortest side kept."""
    max_length: int = 200
    """Longest side kept (very long lines are usually misaligned paragraphs)."""
    max_ratio: float = 3.0
    """Longest allowed ratio of the longer side to the shorter (0 = no ratio filter)."""
    dedup: bool = True
    """Drop repeated (source, target) pairs (whitespace differences aside)."""
    test_size: int | None = None
    """Pairs held out for the final test (BLEU / chrF); unset: 10% of the clean pairs, at most 1,000."""
    val_size: int | None = None
    """Pairs held out for validation during fine-tuning; unset: 5% of the clean pairs, at most 500."""
    seed: int = 0
    """Seed of the shuffle that picks the held-out pairs."""
    on_bad_line: Literal["error", "skip"] = "error"
    """A line that is not UTF-8, not valid JSON, lacks a field or is not two TSV columns: error names
    the file and line; skip counts it."""

    def validate(self) -> None:
        require(bool(self.inputs), "inputs", "required: at least one source of pairs")
        require(bool(self.out), "out", "required: the folder to write train/val/test pair files to")
        require(self.min_length >= 1, "min_length", f"must be >= 1, got {self.min_length}")
        require(self.max_length >= self.min_length, "max_length",
                f"must be >= min_length ({self.min_length}), got {self.max_length}")
        require(self.max_ratio == 0 or self.max_ratio >= 1, "max_ratio",
                f"must be 0 (off) or >= 1, got {self.max_ratio}")
        require((self.test_size or 0) >= 0 and (self.val_size or 0) >= 0, "test_size", "split sizes must be >= 0")


def load_config(path: str | None, overrides: list[str] | None, flags: dict[str, Any] | None = None) -> PairsConfig:
    from slmforge import config

    return config.load_section(PairsConfig, SECTION, path, overrides, flags)


# ---------------------------------------------------------------- reading


class _Bad(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(line: bytes) -> str:
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _Bad("not UTF-8", f"not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _jsonl_pair(text: str, source: PairSourceConfig) -> tuple[str, str]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad("invalid JSON", f"invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise _Bad("not an object", f"expected a JSON object, got {type(record).__name__}")
    sides = []
    for name in (source.src_field, source.tgt_field):
        if name not in record:
            raise _Bad("missing field", f"no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'})")
        if not isinstance(record[name], str):
            raise _Bad("field not text", f"field {name!r} is {type(record[name]).__name__}, expected text")
        sides.append(record[name])
    return sides[0], sides[1]


def _tsv_pair(text: str) -> tuple[str, str]:
    columns = text.split("\t")
    if len(columns) != 2:
        raise _Bad("not two columns", f"expected source TAB target, got {len(columns)} tab-separated column(s)")
    return columns[0], columns[1]


def read_pairs(source: PairSourceConfig, on_bad_line: str, bad: Counter, first_bad: dict[str, str]
               ) -> Iterator[tuple[str, str, str]]:
    """(source, target, file:line) of every readable pair of `source`, as written (not yet trimmed)."""
    def fault(where: str, error: _Bad) -> None:
        if on_bad_line == "error":
            raise SlmforgeError(f"{where}: {error} (pairs.on_bad_line = \"skip\" leaves such lines out)")
        bad[error.reason] += 1
        first_bad.setdefault(error.reason, f"{where}: {error}")

    swap = (lambda a, b: (b, a)) if source.swap else (lambda a, b: (a, b))  # noqa: E731
    if source.path.startswith(PLONE):
        from slmforge.data.demo_corpus import plone_pairs

        for number, (english, translated) in enumerate(plone_pairs(source.path[len(PLONE):]), start=1):
            yield (*swap(english, translated), f"{source.path}#{number}")
        return
    path = Path(source.path)
    if source.tgt_path:
        yield from (( *swap(a, b), where) for a, b, where in _aligned(path, Path(source.tgt_path), fault))
        return
    from slmforge.text.sources import file_format, numbered_lines

    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    kind = source.format if source.format != "auto" else (
        "jsonl" if file_format(path, "auto")[0] == "jsonl" or name.endswith(".json") else "tsv")
    for number, line in numbered_lines(path, "pair file"):
        where = f"{path}:{number}"
        try:
            text = _text(line)
            if not text.strip():
                continue  # a blank line holds no pair at all (an empty side is counted below)
            pair = _jsonl_pair(text, source) if kind == "jsonl" else _tsv_pair(text)
        except _Bad as e:
            fault(where, e)
            continue
        yield (*swap(*pair), where)


def _aligned(src_path: Path, tgt_path: Path, fault) -> Iterator[tuple[str, str, str]]:
    from slmforge.text.sources import numbered_lines

    src_lines, tgt_lines = list(numbered_lines(src_path, "pair file")), list(numbered_lines(tgt_path, "pair file"))
    if len(src_lines) != len(tgt_lines):
        raise SlmforgeError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}: aligned "
                            f"files need one target line per source line")
    for (number, a), (_, b) in zip(src_lines, tgt_lines):
        try:
            texts = []
            for path, line in ((src_path, a), (tgt_path, b)):
                try:
                    texts.append(_text(line))
                except _Bad as e:
                    raise _Bad(e.reason, f"{path}:{number}: {e}") from None
        except _Bad as e:
            fault(f"{src_path}:{number}", e)
            continue
        yield texts[0], texts[1], f"{src_path}:{number}"


# ---------------------------------------------------------------- filtering and splitting


def _length(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


def filter_pairs(pairs: Iterator[tuple[str, str, str]], cfg: PairsConfig, dropped: Counter
                 ) -> list[tuple[str, str, str]]:
    """The pairs that pass every filter, trimmed; `dropped` counts the others by reason."""
    kept, seen = [], set()
    for source, target, where in pairs:
        source, target = source.strip(), target.strip()
        if not source or not target:
            dropped["empty"] += 1
            continue
        lengths = (_length(source, cfg.length_unit), _length(target, cfg.length_unit))
        if min(lengths) < cfg.min_length:
            dropped["too short"] += 1
            continue
        if max(lengths) > cfg.max_length:
            dropped["too long"] += 1
            continue
        if cfg.max_ratio and max(lengths) > cfg.max_ratio * min(lengths):
            dropped["length ratio"] += 1
            continue
        key = (" ".join(source.split()), " ".join(target.split()))
        if cfg.dedup and key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append((source, target, where))
    return kept


def split_pairs(pairs: list[tuple[str, str, str]], cfg: PairsConfig, dropped: Counter
                ) -> dict[str, list[tuple[str, str, str]]]:
    """test, val and train by a seeded shuffle; train and val lose pairs whose source is a test source."""
    # By default a share of the corpus, so a small one keeps most of its pairs for training.
    test_size = cfg.test_size if cfg.test_size is not None else min(1000, len(pairs) // 10)
    val_size = cfg.val_size if cfg.val_size is not None else min(500, len(pairs) // 20)
    held = test_size + val_size
    if held >= len(pairs):
        raise SlmforgeError(f"pairs.test_size + pairs.val_size = {held} leave no training pairs out of "
                            f"{len(pairs)} clean ones; lower them")
    order = np.random.default_rng(cfg.seed).permutation(len(pairs))
    test = [pairs[i] for i in sorted(order[:test_size])]
    test_sources = {" ".join(p[0].split()) for p in test}
    splits = {"test": test}
    for name, chosen in (("val", order[test_size:held]), ("train", order[held:])):
        rows = [pairs[i] for i in sorted(chosen)]
        kept = [p for p in rows if " ".join(p[0].split()) not in test_sources]
        if len(rows) > len(kept):
            dropped["source in test"] += len(rows) - len(kept)
        splits[name] = kept
    if not splits["train"]:
        raise SlmforgeError("no training pairs left after holding out the test and validation pairs")
    smaller = [name for name in ("test", "val") if len(splits[name]) > len(splits["train"])]
    if smaller:  # sizes written for a big corpus, used on a small one: "train 89, val 942, test 2,000"
        say(f"warning: only {len(splits['train']):,} training pairs, fewer than {' and '.join(smaller)} "
            f"({', '.join(f'{n} {len(splits[n]):,}' for n in smaller)}): lower pairs.test_size / pairs.val_size, "
            f"or leave them unset for a share of the corpus (10% and 5%)")
    return splits


def make_pairs(cfg: PairsConfig) -> dict[str, Any]:
    """Read, filter, deduplicate and split every source; write the three files and report.json into
    cfg.out. Returns the report."""
    bad: Counter = Counter()
    first_bad: dict[str, str] = {}
    dropped: Counter = Counter()
    read = 0
    clean: list[tuple[str, str, str]] = []

    def counted(source: PairSourceConfig):
        nonlocal read
        for pair in read_pairs(source, cfg.on_bad_line, bad, first_bad):
            read += 1
            yield pair

    def all_pairs():
        for source in cfg.inputs:
            yield from counted(source)

    clean = filter_pairs(all_pairs(), cfg, dropped)
    if not clean:
        raise SlmforgeError(f"no usable pairs in {', '.join(s.path for s in cfg.inputs)} (read {read}; dropped "
                            f"{_describe(dropped) or 'none'}; bad lines {_describe(bad) or 'none'})")
    splits = split_pairs(clean, cfg, dropped)
    report = {"read": read, "bad_lines": dict(bad), "first_bad_line": first_bad, "dropped": dict(dropped),
              "kept": len(clean), "splits": {name: len(rows) for name, rows in splits.items()},
              "inputs": [s.path if not s.tgt_path else f"{s.path} + {s.tgt_path}" for s in cfg.inputs],
              "filters": {"length_unit": cfg.length_unit, "min_length": cfg.min_length,
                          "max_length": cfg.max_length, "max_ratio": cfg.max_ratio, "dedup": cfg.dedup},
              "seed": cfg.seed}
    _write(Path(cfg.out), splits, report)
    return report


def _describe(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _write(out: Path, splits: dict[str, list[tuple[str, str, str]]], report: dict[str, Any]) -> None:
    """Every file under a temporary name first, then renamed, report.json last: it marks a complete set."""
    texts = {f"{name}.jsonl": "".join(json.dumps({"src": s, "tgt": t}, ensure_ascii=False) + "\n"
                                      for s, t, _ in splits[name]) for name in SPLITS}
    texts["report.json"] = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_files_atomic(out, texts, "pairs.out")


def summary(report: dict[str, Any], out: str) -> str:
    """The one-paragraph account `data pairs` prints."""
    lines = [f"read {report['read']:,} pairs, kept {report['kept']:,}"]
    if report["dropped"]:
        lines.append("dropped " + ", ".join(f"{n:,} {reason}" for reason, n in report["dropped"].items()))
    if report["bad_lines"]:
        lines.append("skipped bad lines " + ", ".join(f"{n:,} {reason}" for reason, n in report["bad_lines"].items())
                     + f" (first: {next(iter(report['first_bad_line'].values()))})")
    lines.append(", ".join(f"{name} {report['splits'][name]:,}" for name in SPLITS) + f" -> {out}")
    return "\n".join(lines)
