"""The curate stages as datatrove pipeline steps, and `Tracked`, which wraps any step to count what it
keeps and removes per language and to keep samples of what it removed.

Our stages are datatrove `BaseFilter`s (return False, or (False, reason), to remove a document) and
formatters; datatrove's own filters (Gopher, C4, FineWeb) and dedup filters are used as they are,
inside `Tracked`. Everything here imports datatrove: import this module only inside `data curate`.
"""

from __future__ import annotations

import codecs
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.stats import Stats
from datatrove.utils.word_tokenizers import WordTokenizer

from slmforge.curate import quality, scripts
from slmforge.curate.config import (
    BlocklistConfig,
    HtmlConfig,
    InputConfig,
    LanguageConfig,
    NormalizeConfig,
    PiiConfig,
    QualityConfig,
    ScriptConfig,
)
from slmforge.curate.redact import Redactor, compile_terms, normalize_term, read_terms
from slmforge.errors import SlmforgeError

SAMPLE_CHARS = 600  # a removed example in the report is cut to this many characters


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def language_of(doc: Document) -> str:
    return doc.metadata.get("language") or "und"


class SampledStats(Stats):
    """datatrove's per-step Stats plus the first few removed examples per reason. They are saved with
    the task's stats file (stats/00003.json), so finished tasks keep theirs across a resumed run."""

    def __init__(self, name: str, stage: str = "", limit: int = 3):
        super().__init__(name)
        self.stage = stage
        self.limit = limit
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def add_sample(self, reason: str, sample: dict[str, Any]) -> None:
        kept = self.samples.setdefault(reason, [])
        if len(kept) < self.limit:
            kept.append(sample)

    def __add__(self, other: Stats) -> SampledStats:
        merged = SampledStats(self.name, self.stage, self.limit)
        base = super().__add__(other)
        merged.time_stats, merged.stats = base.time_stats, base.stats
        for source in (self, other):
            for reason, samples in getattr(source, "samples", {}).items():
                for sample in samples:
                    merged.add_sample(reason, sample)
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "curate_stage": self.stage, "samples": self.samples}


class UnicodeWords(WordTokenizer):
    """A datatrove word tokenizer for any script: words as in `scripts.words` (Indic vowel signs stay
    in their words), sentences ending in . ! ? । ॥ or a newline. Lets datatrove's Gopher, C4, FineWeb
    and MinHash steps run on Hindi or Assamese without spaCy, NLTK or Indic NLP installed."""

    _SENTENCE_END = regex.compile(r"[.!?।॥]+[\"'”’)]*(?=\s|$)|\n+")

    def __init__(self) -> None:
        super().__init__("xx")

    def word_tokenize(self, text: str) -> list[str]:
        return scripts.words(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text) if text[a:b].strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in self._SENTENCE_END.finditer(text):
            if m.end() > start:
                spans.append((start, m.end()))
            start = m.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


# ---------------------------------------------------------------- accounting wrapper


class Tracked(PipelineStep):
    """Runs `inner` as stage `stage` and records, per document language, documents and UTF-8 bytes in
    and out, removals per reason, documents whose text changed, and the first removed examples.

    A `BaseFilter` is asked document by document (its reason names the drop). Any other step (a
    formatter, a dedup filter) runs on the stream as datatrove runs it; a document it consumed without
    passing on was removed, with reason `default_reason`. `languages` limits a filter to documents of
    those languages (others pass untouched); `removed_writer` saves every removed document.
    """

    type = "🧹 - CURATE"

    def __init__(self, stage: str, inner: PipelineStep, *, default_reason: str | None = None,
                 languages: list[str] | None = None, removed_writer: Any = None, samples: int = 3):
        super().__init__()
        self.name = stage
        self.stage = stage
        self.inner = inner
        self.default_reason = default_reason or stage
        self.languages = None if not languages or "*" in languages else frozenset(languages)
        self.removed_writer = removed_writer
        self.stats = SampledStats(str(self), stage, samples)

    # counters are "in/docs/<lang>", "in/bytes/<lang>", "out/...", "drop/<reason>/<lang>", ...
    def _count(self, prefix: str, lang: str, nbytes: int) -> None:
        self.stat_update(f"{prefix}/docs/{lang}")
        self.stat_update(f"{prefix}/bytes/{lang}", value=nbytes)

    def _passed(self, doc: Document, bytes_in: int, text_in: str | None) -> None:
        lang = language_of(doc)
        self._count("in", lang, bytes_in)
        self._count("out", lang, utf8_len(doc.text))
        if text_in is not None and doc.text != text_in:
            self.stat_update(f"changed/docs/{lang}")

    def _removed(self, doc: Document, bytes_in: int, reason: str, writer: Any, rank: int) -> None:
        lang = language_of(doc)
        self._count("in", lang, bytes_in)
        self.stat_update(f"drop/{reason}/{lang}")
        self.stat_update(f"dropbytes/{reason}/{lang}", value=bytes_in)
        text = doc.text
        self.stats.add_sample(reason, {"language": lang, "id": doc.id,
                                       "file": doc.metadata.get("file_path", ""),
                                       "text": text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else "")})
        if writer is not None:
            doc.metadata["curate_stage"] = self.stage
            doc.metadata["curate_reason"] = reason
            writer.write(doc, rank)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        writer = self.removed_writer
        if writer is not None:
            with writer:
                yield from self._run(data, rank, world_size, writer)
        else:
            yield from self._run(data, rank, world_size, None)
        # datatrove's own counters of the wrapped step (e.g. C4's per-line ones) join ours
        for key, value in self.inner.stats.stats.items():
            self.stats[f"inner/{key}"] += value

    def _run(self, data: DocumentsPipeline, rank: int, world_size: int, writer: Any) -> DocumentsPipeline:
        if isinstance(self.inner, BaseFilter):
            yield from self._run_filter(data, rank, writer)
        else:
            yield from self._run_stream(data, rank, world_size, writer)

    def _run_filter(self, data: DocumentsPipeline, rank: int, writer: Any) -> DocumentsPipeline:
        inner = self.inner
        for doc in data:
            bytes_in = utf8_len(doc.text)
            if self.languages is not None and language_of(doc) not in self.languages:
                self._count("in", language_of(doc), bytes_in)
                self._count("out", language_of(doc), bytes_in)
                self.stat_update("skipped_other_language")
                yield doc
                continue
            text_in = doc.text
            with self.track_time():
                keep, reason = get_filter_result(inner.filter(doc))
            if keep:
                self._passed(doc, bytes_in, text_in)
                yield doc
            else:
                self._removed(doc, bytes_in, reason or self.default_reason, writer, rank)

    def _run_stream(self, data: DocumentsPipeline, rank: int, world_size: int, writer: Any) -> DocumentsPipeline:
        # A streaming step asks for document k+1 only after it has passed on or dropped document k,
        # so when it asks again, a document it has not passed on was dropped: constant memory.
        pending: list[Any] = []  # [doc, bytes_in, text_in] of the document the step holds

        def feed() -> DocumentsPipeline:
            for doc in data:
                if pending:
                    self._removed(pending[0], pending[1], self.default_reason, writer, rank)
                    pending.clear()
                pending.extend((doc, utf8_len(doc.text), doc.text))
                yield doc
            if pending:
                self._removed(pending[0], pending[1], self.default_reason, writer, rank)
                pending.clear()

        for out in self.inner.run(feed(), rank, world_size):
            if pending and out is pending[0]:
                self._passed(out, pending[1], pending[2])
                pending.clear()
            else:  # a step that makes new documents: count them as they come
                self._count("out", language_of(out), utf8_len(out.text))
            yield out


# ---------------------------------------------------------------- our stages


class HtmlText(BaseFilter):
    """A document that looks like HTML (or every document, detect = "always") becomes its text
    (`slmforge.curate.markup`); counts `html_stripped`; removes one with no text left ("empty_html")."""

    name = "html"

    def __init__(self, cfg: HtmlConfig):
        super().__init__()
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from slmforge.curate.markup import html_to_text, looks_like_html

        if self.cfg.detect == "auto" and not looks_like_html(doc.text, self.cfg.min_tags):
            return True
        text = html_to_text(doc.text)
        if text != doc.text:
            doc.text = text
            self.stat_update("html_stripped")
        return (False, "empty_html") if not text.strip() else True


class Normalize(BaseFilter):
    """Unicode normalization, mojibake repair (ftfy, through datatrove's FTFYFormatter), control
    characters and whitespace; a document left empty is removed ("empty")."""

    name = "normalize"
    _ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\ufeff\u2060\u00ad"), None)  # ZWJ/ZWNJ (200c/200d) stay
    _SPACES = regex.compile(r"[^\S\n]+")           # any whitespace but a newline (tabs, NBSP, thin spaces)
    _BLANK_LINES = regex.compile(r"\n{3,}")
    _CONTROL = regex.compile(r"[\p{Cc}--[\n\t]]", regex.V1)

    def __init__(self, cfg: NormalizeConfig):
        super().__init__()
        self.cfg = cfg
        self.ftfy = None
        if cfg.fix_mojibake:
            from datatrove.pipeline.formatters import FTFYFormatter

            self.ftfy = FTFYFormatter(normalization=None if cfg.form == "none" else cfg.form)

    def normalize(self, text: str) -> str:
        if self.ftfy is not None:
            text = self.ftfy.format(text)
        elif self.cfg.form != "none":
            text = unicodedata.normalize(self.cfg.form, text)
        if self.cfg.whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n").translate(self._ZERO_WIDTH)
            text = self._CONTROL.sub("", text)
            text = "\n".join(self._SPACES.sub(" ", line).strip() for line in text.split("\n"))
            text = self._BLANK_LINES.sub("\n\n", text).strip()
        return text

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        doc.text = self.normalize(doc.text)
        return (False, "empty") if not doc.text.strip() else True


class ScriptTagger(BaseFilter):
    """Script shares per document, the Assamese/Bengali letter evidence and the romanized-Hindi flag
    in the metadata; removes documents outside `keep` or too mixed, as configured."""

    name = "script"

    def __init__(self, cfg: ScriptConfig):
        super().__init__()
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        counts, markers = scripts.script_counts(doc.text)
        total = sum(counts.values())
        shares = {s: round(n / total, 4) for s, n in counts.most_common()} if total else {}
        main = next(iter(shares), "none")
        doc.metadata["script"] = main
        doc.metadata["script_shares"] = shares
        if main == "Beng":
            variant = scripts.bengali_variant(markers)
            if variant:
                doc.metadata["bengali_script_language"] = variant
        tokens = scripts.words(doc.text)
        romanized = main == "Latn" and scripts.is_romanized_hindi(doc.text, tokens, self.cfg.romanized_min_ratio)
        doc.metadata["romanized_hindi"] = romanized
        if romanized and self.cfg.drop_romanized_hindi:
            return False, "romanized_hindi"
        if self.cfg.keep and main not in self.cfg.keep:
            return False, f"script_{main}"
        if self.cfg.min_share and shares and shares[main] < self.cfg.min_share:
            return False, "mixed_scripts"
        return True


_LOADED_MODELS: dict[tuple, Any] = {}  # one copy per process (loading py3langid's model takes ~0.5 s)


class LanguageModel:
    """py3langid (model inside the package) or a fastText model file; `classify(text) -> (lang, score)`."""

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self._model: Any = None

    def _load(self) -> Any:
        key = (self.cfg.model, tuple(self.cfg.candidates))
        if key not in _LOADED_MODELS:  # forked workers inherit the parent's copy
            _LOADED_MODELS[key] = self._read()
        return _LOADED_MODELS[key]

    def _read(self) -> Any:
        model = self.cfg.model
        if model == "py3langid":
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError:
                raise SlmforgeError("curate.language.model: py3langid is not installed: "
                                    "pip install 'slmforge[curate]'") from None
            ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            if self.cfg.candidates:
                unknown = [c for c in self.cfg.candidates if c not in ident.nb_classes]
                if unknown:
                    raise SlmforgeError(f"curate.language.candidates: py3langid does not know {', '.join(unknown)}")
                ident.set_languages(self.cfg.candidates)
            return ident
        path = Path(model.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise SlmforgeError(f"curate.language.model: fastText model {path} not found; download it "
                                f"(e.g. lid.176.bin) or use model = \"py3langid\", which needs no file")
        try:
            import fasttext
        except ImportError:
            raise SlmforgeError(f"curate.language.model: {model} needs the fasttext package: "
                                "pip install fasttext (or use model = \"py3langid\")") from None
        return fasttext.load_model(str(path))

    def check(self) -> None:
        """Load now, so that a missing model is one line before any work starts."""
        if self._model is None:
            self._model = self._load()

    def classify(self, text: str) -> tuple[str, float]:
        self.check()
        if self.cfg.model == "py3langid":
            lang, score = self._model.classify(text)
            return lang, float(score)
        labels, scores = self._model.predict(" ".join(text.split()), k=1)
        label = labels[0].removeprefix("__label__")  # lid.176: "hi"; GlotLID: "hin_Deva"
        return label, float(scores[0])

    def __getstate__(self) -> dict[str, Any]:  # workers load their own copy
        return {"cfg": self.cfg, "_model": None}


class LanguageTagger(BaseFilter):
    """Language ID into metadata `language` (and `language_score`); Bengali-script documents follow
    their letters (ৰ ৱ: Assamese, র: Bengali) when the model says either of the two; romanized Hindi is
    `hi-Latn`. Removes languages outside `keep`."""

    name = "language"

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LanguageModel(cfg)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("romanized_hindi"):
            lang, score = "hi-Latn", 1.0
        else:
            lang, score = self.model.classify(doc.text)
            variant = doc.metadata.get("bengali_script_language")
            if variant is None and doc.metadata.get("script") is None:
                counts, markers = scripts.script_counts(doc.text)
                if counts and counts.most_common(1)[0][0] == "Beng":
                    variant = scripts.bengali_variant(markers)
            if variant and lang in ("as", "bn") and lang != variant:
                self.stat_update("bengali_script_relabelled")
                lang = variant
            if score < self.cfg.min_score:
                lang = "und"
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if self.cfg.keep and lang not in self.cfg.keep:
            return False, f"language_{lang}"
        return True


class QualityFilter(BaseFilter):
    """Per-language quality thresholds (`slmforge.curate.quality`); reasons like `too_few_words`."""

    name = "quality"

    def __init__(self, cfg: QualityConfig):
        super().__init__()
        self.cfg = cfg
        self._rules: dict[str, tuple[Any, frozenset[str]]] = {}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang = language_of(doc)
        if lang not in self._rules:
            base = lang.split("-")[0]
            rules = quality.thresholds_for(base, self.cfg.languages)
            self._rules[lang] = (rules, quality.stop_words_for(base, rules) if "-" not in lang else frozenset())
        rules, stop = self._rules[lang]
        reason = quality.check(doc.text, lang, rules, stop)
        return (False, reason) if reason else True


class PiiRedactor(BaseFilter):
    """Replaces emails, phone numbers, IP addresses, Aadhaar and PAN numbers with placeholders; never
    removes a document (counts per kind: `inner/redacted_<kind>` in the report)."""

    name = "pii"

    def __init__(self, cfg: PiiConfig):
        super().__init__()
        self.redactor = Redactor(cfg.kinds, cfg.only_public_ips, cfg.placeholders)

    def filter(self, doc: Document) -> bool:
        doc.text, counts = self.redactor.redact(doc.text)
        for kind, n in counts.items():
            self.stat_update(f"redacted_{kind}", value=n)
        return True


class BlocklistFilter(BaseFilter):
    """Your word lists per language, matched whole-word in NFC, case-insensitively, with boundaries
    that hold inside Indic words; drops (`blocklist`) or masks as configured."""

    name = "blocklist"

    def __init__(self, cfg: BlocklistConfig):
        super().__init__()
        self.cfg = cfg
        terms: dict[str, list[str]] = {}
        for lang, path in cfg.files.items():
            terms.setdefault(lang, []).extend(read_terms(path))
        for lang, words in cfg.words.items():
            terms.setdefault(lang, []).extend(normalize_term(w) for w in words)
        self.terms = terms
        self._patterns: dict[str, Any] = {}

    def pattern(self, lang: str) -> Any:
        if lang not in self._patterns:
            self._patterns[lang] = compile_terms(self.terms.get(lang, []) + self.terms.get("*", []))
        return self._patterns[lang]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        pattern = self.pattern(language_of(doc))
        if pattern is None:
            return True
        if self.cfg.action == "mask":
            doc.text, n = pattern.subn(self.cfg.placeholder, doc.text)
            if n:
                self.stat_update("masked", value=n)
            return True
        hits = 0
        for _ in pattern.finditer(doc.text):
            hits += 1
            if hits >= self.cfg.min_hits:
                return False, "blocklist"
        return True


# ---------------------------------------------------------------- reading


class TextReader(BaseDiskReader):
    """Plain text files (datatrove has no reader for them): a document per line, per blank-line
    separated paragraph, or per file."""

    name = "📄 Text"

    def __init__(self, data_folder: Any, unit: str = "line", **kwargs: Any):
        super().__init__(data_folder, **kwargs)
        self.unit = unit

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rt", compression="infer", encoding="utf-8") as f:
            if self.unit == "file":
                units: Any = [f.read()]
            elif self.unit == "paragraph":
                units = _paragraphs(f)
            else:
                units = (line.rstrip("\r\n") for line in f)
            for i, text in enumerate(units):
                if text.strip():
                    doc = self.get_document_from_dict({"text": text}, filepath, i)
                    if doc is not None:
                        yield doc


def _paragraphs(lines: Any) -> Any:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def file_format(path: str, declared: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".zst", ".zstd", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    if declared != "auto":
        return declared
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


class CurateReader(PipelineStep):
    """Reads the input files assigned to this task (file k goes to task k mod tasks) with datatrove's
    JsonlReader / ParquetReader or our TextReader, and sets metadata `language` to the input's `lang`.

    A file that cannot be opened, is corrupt (a truncated .gz) or is not UTF-8 is checked for before any
    of its documents is passed on, so it is either skipped whole (named and counted: `bad_file`) or,
    with on_bad_file = "fail", stops the run with a one-line error naming it.
    """

    type = "📖 - READER"
    name = "inputs"

    def __init__(self, files: list[tuple[str, InputConfig]], on_bad_file: str = "skip", samples: int = 3):
        super().__init__()
        self.files = files
        self.on_bad_file = on_bad_file
        self.stats = SampledStats(str(self), "read", max(samples, 20))
        self.read_docs = 0
        self.read_bytes = 0

    def _reader(self, path: str, source: InputConfig) -> tuple[str, BaseDiskReader]:
        from datatrove.pipeline.readers import JsonlReader, ParquetReader

        folder, name = str(Path(path).parent), Path(path).name
        common = {"text_key": source.text_field, "default_metadata": {"language": source.lang}}
        fmt = file_format(name, source.format)
        if fmt == "jsonl":
            return fmt, JsonlReader(folder, compression="infer", **common)
        if fmt == "parquet":
            return fmt, ParquetReader(folder, read_metadata=True, **common)
        return fmt, TextReader(folder, unit=source.text_unit, **common)

    def _bad(self, path: str, why: str) -> None:
        if self.on_bad_file == "fail":
            raise SlmforgeError(f"{path}: {why} (curate.on_bad_file = \"fail\"; set it to \"skip\" to "
                                "skip such files and list them in the report)")
        self.stat_update("bad_files")
        self.stats.add_sample("bad_file", {"file": path, "error": why})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for k, (path, source) in enumerate(self.files):
            if k % world_size != rank:
                continue
            self.stat_update("input_files")
            fmt, reader = self._reader(path, source)
            problem, lines = check_file(path, fmt, source.text_field)
            if problem:
                self._bad(path, problem)
                continue
            count = 0
            try:
                for doc in reader.read_file(Path(path).name):
                    count += 1
                    self.read_docs += 1
                    self.read_bytes += utf8_len(doc.text)
                    self.stat_update("documents")
                    yield doc
            except SlmforgeError:
                raise
            except Exception as e:  # pyarrow, gzip and fsspec raise many types for a damaged file
                self._bad(path, f"unreadable after {count} documents ({type(e).__name__}: {e})")
                continue
            # datatrove's JsonlReader skips (and only logs) a line that is not JSON or has no text
            if fmt == "jsonl" and lines > count:
                self.stat_update("unusable_records", value=lines - count)
                self.stats.add_sample("unusable_records", {"file": path, "records": lines - count,
                                                           "error": "not JSON, or no text in the text field"})


def check_file(path: str, fmt: str, text_field: str) -> tuple[str | None, int]:
    """(why `path` cannot be read or None, its number of non-blank lines): read it through once,
    decompressing and decoding UTF-8, so no document of a bad file is ever passed on."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            if text_field not in names:
                return f"no column {text_field!r} (has {', '.join(names[:8])})", 0
            return None, parquet.metadata.num_rows
        import fsspec

        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        line, blank, tail = 1, 0, b"\n"
        with fsspec.open(path, "rb", compression="infer") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    where = line + chunk.count(b"\n", 0, e.start)
                    return f"not UTF-8 (line {where}): convert it, e.g. iconv -t UTF-8", 0
                line += chunk.count(b"\n")
                blank += (tail[-1:] + chunk).count(b"\n\n")  # empty lines (whitespace-only ones count as text)
                tail = chunk
            decoder.decode(b"", final=True)
        lines = line - 1 + (tail[-1:] != b"\n")
    except UnicodeDecodeError:
        return "not UTF-8 (ends inside a character)", 0
    except Exception as e:  # OSError, EOFError, gzip.BadGzipFile, zstd errors, pyarrow errors
        return f"unreadable ({type(e).__name__}: {e})", 0
    return None, max(lines - blank, 0)


# ---------------------------------------------------------------- plumbing


class EnsureShard(PipelineStep):
    """After a writer: create this task's (empty) output file if it wrote nothing, so that task k of
    the next job reads exactly file k of this one."""

    type = "💽 - WRITER"
    name = "ensure shard"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


class TaskProgress(PipelineStep):
    """Last step of the first job: a line per task every `interval` seconds with documents read,
    docs/s, MB/s and the share kept so far."""

    type = "📊 - PROGRESS"
    name = "progress"

    def __init__(self, reader: CurateReader, interval: float = 10.0, enabled: bool = True):
        super().__init__()
        self.reader = reader
        self.interval = interval
        self.enabled = enabled

    def _say(self, rank: int, world_size: int, kept: int, start: float, final: bool = False) -> None:
        from slmforge.formatting import quiet

        if quiet():  # `slmforge --quiet`, inherited by the worker processes
            return
        elapsed = max(time.monotonic() - start, 1e-9)
        read = self.reader.read_docs
        line = (f"curate: task {rank + 1}/{world_size}{' done' if final else ''}: {read:,} docs read, "
                f"{read / elapsed:,.0f} docs/s, {self.reader.read_bytes / 1e6 / elapsed:.2f} MB/s, "
                f"kept {100 * kept / read if read else 0:.1f}%")
        print(line, file=sys.stderr, flush=True)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        start = last = time.monotonic()
        kept = 0
        for doc in data or ():
            kept += 1
            yield doc
            if self.enabled and time.monotonic() - last >= self.interval:
                last = time.monotonic()
                self._say(rank, world_size, kept, start)
        if self.enabled:
            self._say(rank, world_size, kept, start, final=True)
