"""Where documents come from, streamed one at a time with bounded memory.

A source is a file, a folder (recursive, sorted), a glob or a Hugging Face dataset (`hf:NAME`). Files
are plain text, JSONL or Parquet; `.gz` and `.zst` files are decompressed on the fly.

Nothing is dropped silently: every skipped unit (invalid UTF-8, empty, broken JSON line, missing or
non-text field) is counted in `ReadStats`, per reason and per file, with the first line it happened on.
A `SourceReader` also knows its position (file, byte offset, line), so a run can resume where it was.

Uncompressed text and JSONL files can also be read in pieces by other processes: `SourceReader.ranges`
cuts them into `RangeJob`s of byte ranges that start and end at unit boundaries (after a newline; after
a blank line for paragraphs), any process reads a job with `RangeJob.read`, and `count_range` adds what
it counted to the reader, in order, with the same documents, counts and line numbers as reading it here.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slmforge.config import require
from slmforge.errors import SlmforgeError

SKIP_REASONS = ("invalid_utf8", "empty", "bad_json", "missing_field", "not_text")
_GLOB_CHARS = "*?["
_READ_BUFFER = 1 << 20


class UnreadableFile(SlmforgeError):
    """A file refused as a whole (mostly not UTF-8): the run cannot go on past it, and a rerun after fixing
    it reads another input, so whatever was written from it is of no use."""


@dataclass
class SourceConfig:
    """One input of a data mixture."""

    path: str
    """A file, a folder (read recursively, in sorted order), a glob such as `corpus/**/*.jsonl`, or
    `hf:NAME` for a Hugging Face dataset (hub id or local folder; needs `pip install datasets`)."""
    lang: str = "und"
    """Language code, e.g. `as`, `hi`, `en` (`und` when unknown); recorded in the manifest."""
    weight: float | None = None
    """Share of the mixture when sampling = "ratio" (normalized over sources). Set it on every source
    or on none; with none, sources mix in proportion to their number of documents."""
    text_field: str = "text"
    """Field holding the text in JSONL records, Parquet columns and dataset rows."""
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = "auto"
    """How to read files. `auto`: .jsonl/.json/.ndjson are JSONL, .parquet is Parquet, anything else is
    text (after removing .gz/.zst); a path starting with `hf:` is a Hugging Face dataset."""
    text_unit: Literal["auto", "line", "paragraph", "file"] = "auto"
    """Text files only: a document is one line, one blank-line-separated paragraph, or one whole file.
    `auto` looks at each file's first 64 KB: wrapped prose (blank lines between paragraphs of several
    short lines, as in a book) is read by paragraph, anything else (one sentence or document per line)
    by line; the choice is printed and recorded per file."""
    hf_subset: str | None = None
    """Hugging Face dataset configuration (subset) name, e.g. a language code."""
    hf_split: str = "train"
    """Hugging Face dataset split to read."""

    def validate(self) -> None:
        require(bool(self.path.strip()), "path", "must not be empty")
        require(self.weight is None or self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        require(bool(self.text_field), "text_field", "must not be empty")

    @property
    def is_hf(self) -> bool:
        return self.format == "hf" or self.path.startswith("hf:")


@dataclass
class ReadStats:
    """What reading one source yielded and skipped: totals per reason and, per file, documents and
    skips as `{reason: {"count": n, "first_line": line}}` (for Parquet and datasets, the row number)."""

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def file(self, name: str) -> dict[str, Any]:
        return self.files.setdefault(name, {"documents": 0, "skipped": {}})

    def skip(self, entry: dict[str, Any], reason: str, line: int, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        seen = entry["skipped"].setdefault(reason, {"count": 0, "first_line": line})
        seen["count"] += count

    def copy(self) -> ReadStats:
        return ReadStats.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "skipped": dict(self.skipped),
            "files": {name: {**f, "skipped": {r: dict(s) for r, s in f["skipped"].items()}}
                      for name, f in self.files.items()},
        }

    def snapshot(self) -> dict[str, Any]:
        """`to_dict()` for frequent checkpoints: files are read one after another and a finished
        file's entry never changes again, so only the newest entry is copied; the rest are shared.
        With thousands of files this is a dict copy instead of a deep copy per batch."""
        files = dict(self.files)
        if files:
            name = next(reversed(files))
            entry = files[name]
            files[name] = {**entry, "skipped": {r: dict(s) for r, s in entry["skipped"].items()}}
        return {"documents": self.documents, "skipped": dict(self.skipped), "files": files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadStats:
        out = cls(int(data["documents"]), dict(data["skipped"]))
        out.files = {name: {**f, "skipped": {r: dict(s) for r, s in f["skipped"].items()}}
                     for name, f in data["files"].items()}
        return out

    def describe_skips(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "nothing"


# ---------------------------------------------------------------- files


def resolve_files(source: SourceConfig) -> list[Path]:
    """The files of a file/folder/glob source, sorted so every run reads them in the same order."""
    path = source.path
    if any(c in path for c in _GLOB_CHARS) and not Path(path).exists():
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise SlmforgeError(f"{path}: no files match this pattern")
        return files
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        # Hidden files (.DS_Store, .git/...) are never corpus text.
        files = sorted((p for p in root.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise SlmforgeError(f"{path}: folder has no files")
        return files
    raise SlmforgeError(f"{path}: no such file or folder")


def file_format(path: Path, declared: str) -> tuple[str, str | None]:
    """(format, compression) of one file: the declared format or one guessed from the extension."""
    name = path.name.lower()
    compression = None
    if name.endswith(".gz"):
        compression, name = "gz", name[:-3]
    elif name.endswith((".zst", ".zstd")):
        compression, name = "zst", name.rsplit(".", 1)[0]
    if declared != "auto":
        return declared, compression
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl", compression
    if name.endswith(".parquet"):
        return "parquet", compression
    return "text", compression


def open_stream(raw: io.BufferedReader, compression: str | None, path: Path) -> io.BufferedIOBase:
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise SlmforgeError(f"{path}: reading .zst files needs `zstandard`: "
                                "pip install 'slmforge[data]'") from None
        # Files written by `zstd` may hold several frames; read them all.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=False)
        return io.BufferedReader(reader, buffer_size=_READ_BUFFER)
    return raw


def _skip_bytes(stream: io.BufferedIOBase, count: int, raw: io.BufferedReader) -> None:
    """Move to uncompressed offset `count`: a seek for plain files, read-and-discard otherwise."""
    if stream is raw:
        stream.seek(count)
        return
    while count > 0:
        chunk = stream.read(min(count, _READ_BUFFER))
        if not chunk:
            break
        count -= len(chunk)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


# ---------------------------------------------------------------- reading


class SourceReader:
    """Iterates the documents of one source and records its position after each one.

    `cursor()` is `{"file": i, "offset": uncompressed byte offset, "line": lines (or rows) read}`;
    a reader built with that cursor and a copy of `stats` taken at the same moment continues with
    the next document and ends with the same counts as an uninterrupted read.
    """

    def __init__(self, source: SourceConfig, stats: ReadStats | None = None,
                 cursor: dict[str, int] | None = None, *, max_invalid_share: float | None = None,
                 say: Callable[[str], None] | None = None, files: list[Path] | None = None):
        self.source = source
        # Fail on a file where more than this share of the units is not UTF-8 (a binary file, another
        # encoding): skipping them would leave a few stray "lines" and a success status.
        self.max_invalid_share = max_invalid_share
        self.say = say  # hears which unit `text_unit = "auto"` chose, once per source
        self._announced = False
        self.stats = stats if stats is not None else ReadStats()
        cursor = cursor or {}
        self._file = int(cursor.get("file", 0))
        self._offset = int(cursor.get("offset", 0))
        self._line = int(cursor.get("line", 0))
        # `files` given: already resolved (a RangeJob reads one file without listing its folder again)
        self.files: list[Path] = files if files is not None else [] if source.is_hf else resolve_files(source)
        self.file_sizes = [p.stat().st_size for p in self.files]
        self._raw: io.BufferedReader | None = None

    def cursor(self) -> dict[str, int]:
        return {"file": self._file, "offset": self._offset, "line": self._line}

    def total_bytes(self) -> int | None:
        """Bytes on disk of all files (None for datasets): the denominator of progress."""
        return None if self.source.is_hf else sum(self.file_sizes)

    def consumed_bytes(self) -> int:
        """Bytes on disk read so far (compressed bytes for compressed files)."""
        done = sum(self.file_sizes[:self._file])
        if self._raw is not None and not self._raw.closed:
            done += self._raw.tell()
        elif self._file < len(self.files) and file_format(self.files[self._file], self.source.format)[1] is None:
            done += self._offset  # counted by ranges (or resumed): the offset is the position on disk
        return done

    def require_documents(self) -> None:
        """The end of the source: one line naming it when it yielded no document at all."""
        if self.stats.documents == 0:
            where = "dataset" if self.source.is_hf else f"{len(self.files)} file(s)"
            raise SlmforgeError(f"{self.source.path}: no documents in {where} "
                                f"(skipped: {self.stats.describe_skips()})")

    def __iter__(self) -> Iterator[str]:
        if self.source.is_hf:
            yield from self._read_hf()
        else:
            while self._file < len(self.files):
                path = self.files[self._file]
                fmt, compression = file_format(path, self.source.format)
                if fmt == "parquet":
                    if compression:
                        raise SlmforgeError(f"{path}: compressed Parquet is not supported "
                                            "(Parquet compresses internally; decompress the file)")
                    yield from self._read_parquet(path)
                else:
                    yield from self._read_stream(path, fmt, compression)
                self._check_invalid(path)
                self._file, self._offset, self._line = self._file + 1, 0, 0
        self.require_documents()

    # -- byte ranges of uncompressed text and JSONL, read by other processes

    def reads_by_range(self) -> bool:
        """True when every file is uncompressed text or JSONL, which `ranges` can cut anywhere a unit
        starts (compressed streams cannot be entered in the middle; Parquet and datasets have no lines)."""
        return not self.source.is_hf and all(
            file_format(path, self.source.format) in (("text", None), ("jsonl", None)) for path in self.files)

    def ranges(self, range_bytes: int) -> Iterator[RangeJob]:
        """The files from the cursor on as jobs of about `range_bytes` (only when `reads_by_range`): each
        file's ranges in order, several small files in one job. Planning reads a few bytes around each
        cut (and, for `text_unit = "auto"`, each file's head); it leaves the cursor alone: `count_range`
        moves it as the jobs' results come back, so the jobs ahead of it can be planned already."""
        return self._plan(self._file, self._offset, range_bytes)

    def _plan(self, first_file: int, first_offset: int, range_bytes: int) -> Iterator[RangeJob]:
        pieces: list[FileRange] = []
        size = 0
        for index in range(first_file, len(self.files)):
            path, total = self.files[index], self.file_sizes[index]
            unit = self._range_unit(index)
            start = first_offset if index == first_file else 0
            while True:  # at least one range per file, however empty: counting it finishes the file
                end = total if unit == "file" else _unit_boundary(path, start + range_bytes - size, unit, total)
                pieces.append(FileRange(index, str(path), start, end, unit))
                size += end - start
                if size >= range_bytes:
                    yield RangeJob(self.source, tuple(pieces))
                    pieces, size = [], 0
                if end >= total:
                    break
                start = end
        if pieces:
            yield RangeJob(self.source, tuple(pieces))

    def _range_unit(self, index: int) -> str:
        """The unit of file `index`: "jsonl", or its text unit (configured, recorded by a resumed run, or
        detected from its head)."""
        path = self.files[index]
        if file_format(path, self.source.format)[0] == "jsonl":
            return "jsonl"
        if self.source.text_unit != "auto":
            return self.source.text_unit
        recorded = self.stats.files.get(str(path), {}).get("text_unit")
        return recorded or self._detect_unit(path, None)

    def count_range(self, part: FileRange, stats: ReadStats, lines: int) -> None:
        """Add what reading `part` of the current file counted elsewhere (`RangeJob.read`): its documents
        and skips, their line numbers moved past the lines before it, and the cursor, which moves to the
        range's end and on to the next file when the range ends this one (checking its share of non-UTF-8
        units as reading it here would). Ranges must come in order."""
        if (part.file, part.start) != (self._file, self._offset):
            raise ValueError(f"count_range: range {part.file}:{part.start} counted at {self._file}:{self._offset}")
        path = self.files[self._file]
        entry = self.stats.file(str(path))
        if part.unit != "jsonl" and self.source.text_unit == "auto":
            entry.setdefault("text_unit", part.unit)
        for counted in stats.files.values():
            entry["documents"] += counted["documents"]
            for reason, seen in counted["skipped"].items():
                self.stats.skip(entry, reason, self._line + seen["first_line"], seen["count"])
        self.stats.documents += stats.documents
        self._offset, self._line = part.end, self._line + lines
        if part.end >= self.file_sizes[self._file]:
            self._check_invalid(path)
            self._file, self._offset, self._line = self._file + 1, 0, 0

    @classmethod
    def read_range(cls, source: SourceConfig, part: FileRange) -> tuple[list[str], ReadStats, int]:
        """The documents of one range of `source`'s files, read alone: with what reading them counted
        (lines numbered from the range's start) and how many lines the range held."""
        reader = cls(source, cursor={"offset": part.start}, files=[Path(part.path)])
        documents = list(reader._read_range(part))
        return documents, reader.stats, reader._line

    def _read_range(self, part: FileRange) -> Iterator[str]:
        """The documents of `part` of this reader's (only) file, the cursor at its start and line 0."""
        path = self.files[self._file]
        entry = self.stats.file(str(path))
        try:
            with open(path, "rb") as f:
                f.seek(part.start)
                data = f.read(part.end - part.start)
        except OSError as e:
            raise SlmforgeError(f"{path}: cannot read ({e.strerror or e})") from None
        if len(data) != part.end - part.start:
            raise SlmforgeError(f"{path}: shorter than when the run started; was it changed while being read?")
        stream = io.BytesIO(data)
        if part.unit == "jsonl":
            yield from self._jsonl_units(stream, entry)
        elif part.unit == "line":
            yield from self._line_units(stream, entry)
        elif part.unit == "paragraph":
            yield from self._paragraph_units(stream, entry)
        else:
            yield from self._file_unit(stream, entry)

    # -- text and JSONL (plain, .gz, .zst)

    def _read_stream(self, path: Path, fmt: str, compression: str | None) -> Iterator[str]:
        entry = self.stats.file(str(path))
        try:
            raw = open(path, "rb", buffering=_READ_BUFFER)
        except OSError as e:
            raise SlmforgeError(f"{path}: cannot open ({e.strerror or e})") from None
        with raw:
            self._raw = raw
            try:
                with open_stream(raw, compression, path) as stream:
                    _skip_bytes(stream, self._offset, raw)
                    unit = self._text_unit(path, compression, entry) if fmt == "text" else None
                    if fmt == "jsonl":
                        yield from self._jsonl_units(stream, entry)
                    elif unit == "line":
                        yield from self._line_units(stream, entry)
                    elif unit == "paragraph":
                        yield from self._paragraph_units(stream, entry)
                    else:
                        yield from self._file_unit(stream, entry)
            except _corrupt_errors() as e:
                raise SlmforgeError(f"{path}: cannot read past line {self._line} "
                                    f"({type(e).__name__}: {e})") from None
            finally:
                self._raw = None

    def _text_unit(self, path: Path, compression: str | None, entry: dict[str, Any]) -> str:
        """The configured unit, or for `auto` the one detected from the file's head (recorded in the
        file's stats entry; the same on a resumed run, since the file is unchanged)."""
        if self.source.text_unit != "auto":
            return self.source.text_unit
        if "text_unit" not in entry:
            entry["text_unit"] = self._detect_unit(path, compression)
        return entry["text_unit"]

    def _detect_unit(self, path: Path, compression: str | None) -> str:
        unit, why = detect_text_unit(path, compression)
        if unit == "paragraph" and self.say is not None and not self._announced:
            self._announced = True
            others = " (each of the source's files is checked the same way)" if len(self.files) > 1 else ""
            self.say(f"{path}: {why}: one document per paragraph{others} (text_unit = \"auto\"; "
                     f"set text_unit = \"line\" for one document per line)")
        return unit

    def _check_invalid(self, path: Path) -> None:
        if self.max_invalid_share is None:
            return
        entry = self.stats.files.get(str(path))
        if entry is None:
            return
        bad = entry["skipped"].get("invalid_utf8")
        units = entry["documents"] + sum(s["count"] for s in entry["skipped"].values())
        if bad and bad["count"] > self.max_invalid_share * units:
            what = "rows" if file_format(path, self.source.format)[0] == "parquet" else "lines"
            raise UnreadableFile(f"{path}: {bad['count']:,} of {units:,} {what} are not UTF-8 (first at line "
                                f"{bad['first_line']}): a binary file or another encoding? Convert it "
                                f"(e.g. `iconv -f LATIN1 -t UTF-8`) or remove it (data.max_invalid_utf8 = "
                                f"{self.max_invalid_share:g} is the share tolerated)")

    def _lines(self, stream: io.BufferedIOBase) -> Iterator[bytes]:
        """Raw lines without their line ending; advances offset/line as it goes."""
        for raw_line in stream:
            if self._offset == 0 and raw_line.startswith((b"\xff\xfe", b"\xfe\xff")):
                # UTF-16 (Windows' "Unicode"): its ASCII and Devanagari code units are mostly valid
                # UTF-8 bytes, so it would pass line by line as text full of NULs.
                raise SlmforgeError(f"{self.files[self._file]}: UTF-16 text (it starts with a UTF-16 byte order "
                                    f"mark); convert it: iconv -f UTF-16 -t UTF-8 IN > OUT")
            if self._offset == 0 and raw_line.startswith(b"\xef\xbb\xbf"):
                raw_line = raw_line[3:]  # a UTF-8 byte order mark is not text
                self._offset = 3
            self._offset += len(raw_line)
            self._line += 1
            yield raw_line.rstrip(b"\r\n")

    def _accept(self, entry: dict[str, Any], text: str) -> bool:
        if not text.strip():
            self.stats.skip(entry, "empty", self._line)
            return False
        entry["documents"] += 1
        self.stats.documents += 1
        return True

    def _line_units(self, stream: io.BufferedIOBase, entry: dict[str, Any]) -> Iterator[str]:
        for body in self._lines(stream):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                self.stats.skip(entry, "invalid_utf8", self._line)
                continue
            if self._accept(entry, text):
                yield text

    def _paragraph_units(self, stream: io.BufferedIOBase, entry: dict[str, Any]) -> Iterator[str]:
        lines: list[bytes] = []
        first = 0
        for body in self._lines(stream):
            if body.strip():
                if not lines:
                    first = self._line
                lines.append(body)
                continue
            if lines:
                text = self._decode_block(lines, first, entry)
                lines = []
                if text is not None and self._accept(entry, text):
                    yield text
        if lines:
            text = self._decode_block(lines, first, entry)
            if text is not None and self._accept(entry, text):
                yield text

    def _file_unit(self, stream: io.BufferedIOBase, entry: dict[str, Any]) -> Iterator[str]:
        if self._offset:  # resumed after this file was already yielded
            return
        data = stream.read()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        self._offset, self._line = len(data), data.count(b"\n") + 1
        text = self._decode_block([data], 1, entry)
        if text is not None and self._accept(entry, text):
            yield text

    def _decode_block(self, lines: list[bytes], first: int, entry: dict[str, Any]) -> str | None:
        block = b"\n".join(lines)
        try:
            return block.decode("utf-8")
        except UnicodeDecodeError as e:
            self.stats.skip(entry, "invalid_utf8", first + block.count(b"\n", 0, e.start))
            return None

    def _jsonl_units(self, stream: io.BufferedIOBase, entry: dict[str, Any]) -> Iterator[str]:
        key = self.source.text_field
        for body in self._lines(stream):
            if not body.strip():
                self.stats.skip(entry, "empty", self._line)
                continue
            try:
                record = json.loads(body)
            except UnicodeDecodeError:  # a ValueError too, so caught first
                self.stats.skip(entry, "invalid_utf8", self._line)
                continue
            except ValueError:
                self.stats.skip(entry, "bad_json", self._line)
                continue
            if not isinstance(record, dict):
                self.stats.skip(entry, "bad_json", self._line)
                continue
            text = self._field_text(record.get(key), entry, self._line)
            # JSON escapes can encode lone surrogates ("\ud800"), which are not valid UTF-8.
            if text is not None and b"\\u" in body and not _encodable(text):
                self.stats.skip(entry, "invalid_utf8", self._line)
                continue
            if text is not None and self._accept(entry, text):
                yield text

    def _field_text(self, value: Any, entry: dict[str, Any], line: int) -> str | None:
        if value is None:
            self.stats.skip(entry, "missing_field", line)
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                self.stats.skip(entry, "invalid_utf8", line)
                return None
        if not isinstance(value, str):
            self.stats.skip(entry, "not_text", line)
            return None
        return value

    # -- Parquet

    def _read_parquet(self, path: Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SlmforgeError(f"{path}: reading Parquet needs `pyarrow`: "
                                "pip install 'slmforge[data]'") from None
        entry = self.stats.file(str(path))
        key = self.source.text_field
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise SlmforgeError(f"{path}: not a readable Parquet file ({e})") from None
        total = parquet.metadata.num_rows
        if key not in parquet.schema_arrow.names:
            if self._line < total:  # every row lacks the field; count them, keep going
                self.stats.skip(entry, "missing_field", self._line + 1, total - self._line)
                self._line = total
            return
        # Skip whole row groups already read on a resumed run, then rows inside the next one.
        groups, start = [], 0
        for g in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            if groups or start + rows > self._line:
                groups.append(g)
            else:
                start += rows
        skip = self._line - start
        batches = parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[key])
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a damaged row group: say where, keep the traceback out
                raise SlmforgeError(f"{path}: cannot read past row {self._line} ({e})") from None
            if batch is None:
                break
            values = batch.column(0).to_pylist()
            if skip:
                values, skip = values[skip:], max(0, skip - len(values))
            for value in values:
                self._line += 1
                text = self._field_text(value, entry, self._line)
                if text is not None and self._accept(entry, text):
                    yield text

    # -- Hugging Face datasets

    def _read_hf(self) -> Iterator[str]:
        rows = _open_hf(self.source)
        entry = self.stats.file(self.source.path)
        key = self.source.text_field
        if self._line:
            rows = rows.skip(self._line)
        for row in rows:
            self._line += 1
            text = self._field_text(row.get(key), entry, self._line)
            if text is not None and self._accept(entry, text):
                yield text


@dataclass(frozen=True)
class FileRange:
    """Bytes [start, end) of one of a source's uncompressed files, cut where a unit starts."""

    file: int   # index in the source's files
    path: str
    start: int
    end: int
    unit: str   # "line", "paragraph", "file" or "jsonl"


@dataclass(frozen=True)
class RangeJob:
    """Consecutive byte ranges of one source's files: a piece of work that any process reads by itself,
    so that the text never has to be sent to it (`data prepare`'s workers)."""

    source: SourceConfig
    ranges: tuple[FileRange, ...]

    def read(self) -> tuple[list[str], list[tuple[ReadStats, int]]]:
        """The documents of the ranges in order and, per range, what reading it counted (lines numbered
        from the range's start) and how many lines it held: what `SourceReader.count_range` takes."""
        texts: list[str] = []
        counted = []
        for part in self.ranges:
            documents, stats, lines = SourceReader.read_range(self.source, part)
            texts.extend(documents)
            counted.append((stats, lines))
        return texts, counted


_SCAN_BLOCK = 1 << 16  # bytes read at a time while looking for where a unit starts


def _unit_boundary(path: Path, target: int, unit: str, total: int) -> int:
    """The first offset >= `target` where a unit of `path` starts, or `total` (the file's size): just
    after a newline, or for paragraphs just after a blank line. A newline byte is never inside a UTF-8
    character, and "\\r\\n" stays whole since the cut follows its "\\n". A line that is blank only after
    the reader strips a byte order mark is not taken as a cut: any later blank line is as good."""
    if target >= total:
        return total
    with open(path, "rb") as f:
        position = _line_end(f, target - 1)  # the end of the line holding byte target - 1
        if unit == "paragraph":
            while position < total:
                end = _line_end(f, position)
                blank = _is_blank(f, position, end)
                position = end
                if blank:
                    break
    return min(position, total)


def _is_blank(f, start: int, end: int) -> bool:
    """Whether bytes [start, end) are whitespace only, read block by block."""
    f.seek(start)
    while start < end:
        data = f.read(min(_SCAN_BLOCK, end - start))
        if not data:
            break
        if data.strip():
            return False
        start += len(data)
    return True


def _line_end(f, start: int) -> int:
    """The offset just after the first newline at or after `start` (the file's end if none), found
    block by block: a multi-megabyte line (a long JSONL record) is never held in memory whole."""
    f.seek(start)
    position = start
    while True:
        data = f.read(_SCAN_BLOCK)
        if not data:
            return position
        newline = data.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(data)


def numbered_lines(path: Path, what: str = "file") -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of a plain, .gz or .zst file: the pair and example readers'
    shared loop ("{path}: {what} not found" when it is missing). A UTF-8 byte order mark at the start
    of the first line is dropped (editors on Windows write one; it is not text), and a damaged
    compressed file (a bad header, a truncated stream) is one line naming the file and how far it read,
    as `SourceReader` says it."""
    if not path.is_file():
        raise SlmforgeError(f"{path}: {what} not found")
    _, compression = file_format(path, "auto")
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise SlmforgeError(f"{path}: cannot open ({e.strerror or e})") from None
    number = 0
    with raw:
        try:
            with open_stream(raw, compression, path) as stream:
                for number, line in enumerate(stream, start=1):
                    if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                        line = line[3:]
                    yield number, line
        except _corrupt_errors() as e:
            raise SlmforgeError(f"{path}: cannot read past line {number} ({type(e).__name__}: {e})") from None


DETECT_BYTES = 1 << 16


def detect_text_unit(path: Path, compression: str | None = None) -> tuple[str, str]:
    """("paragraph", why) when the head of a text file looks like wrapped prose (a book, an article
    saved from an editor): blank lines between paragraphs of several lines, and lines broken at a width
    rather than at sentence ends (most lines that continue into the next one are short and end without
    . ! ? । ॥). Otherwise ("line", why): a sentence or a document per line, which stays the unit."""
    try:
        with open(path, "rb") as raw, open_stream(raw, compression, path) as stream:
            head = stream.read(DETECT_BYTES)
            complete = len(head) < DETECT_BYTES
    except _corrupt_errors():  # the reader itself reports a damaged file, naming the line
        return "line", "unreadable head"
    raw_lines = head.split(b"\n")
    if not complete and len(raw_lines) > 1:
        raw_lines = raw_lines[:-1]  # the last line may be cut by the 64 KB window
    lines = [line.decode("utf-8", errors="replace").strip() for line in raw_lines]
    if sum("\ufffd" in line for line in lines) > 0.1 * len(lines):
        return "line", "mostly not UTF-8"  # a binary file: the reader counts (and may refuse) its lines
    filled = [line for line in lines if line]
    paragraphs = sum(1 for i, line in enumerate(lines) if line and (i == 0 or not lines[i - 1]))
    # lines followed by another line of the same paragraph: in wrapped prose, broken at a width
    inner = [line for line, nxt in zip(lines, lines[1:]) if line and nxt]
    if paragraphs < 3 or len(filled) < 8 or len(inner) < 4:
        return "line", "no blank-line paragraphs of several lines"
    per_paragraph = len(filled) / paragraphs
    median = sorted(len(line) for line in inner)[len(inner) // 2]
    ended = sum(line.endswith(_SENTENCE_ENDS) for line in inner) / len(inner)
    why = (f"{per_paragraph:.1f} lines per blank-line paragraph, median line {median} characters, "
           f"{ended:.0%} of them end a sentence")
    if per_paragraph >= 2 and median <= 100 and ended < 0.5:
        return "paragraph", f"wrapped prose ({why})"
    return "line", why


_SENTENCE_ENDS = (".", "!", "?", "।", "॥", "\"", "'", "”", "’", ":", ";", "»", "。")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _open_hf(source: SourceConfig) -> Any:
    """An iterable dataset of rows: a `save_to_disk` folder, or `load_dataset(..., streaming=True)`."""
    try:
        import datasets
    except ImportError:
        raise SlmforgeError(f"{source.path}: reading Hugging Face datasets needs `datasets`: "
                            "pip install 'slmforge[data]'") from None
    name = source.path[3:] if source.path.startswith("hf:") else source.path
    local = Path(name).expanduser()
    try:
        if local.is_dir() and any((local / f).is_file()
                                  for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            data = datasets.load_from_disk(str(local))  # memory-mapped Arrow: bounded memory
            if isinstance(data, datasets.DatasetDict):
                if source.hf_split not in data:
                    raise SlmforgeError(f"{source.path}: no split {source.hf_split!r} "
                                        f"(have {', '.join(data)})")
                data = data[source.hf_split]
            return data.to_iterable_dataset()
        return datasets.load_dataset(name, source.hf_subset, split=source.hf_split, streaming=True)
    except SlmforgeError:
        raise
    except Exception as e:  # datasets raises many types (missing repo, offline, bad config)
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SlmforgeError(f"{source.path}: cannot open dataset ({type(e).__name__}: {message})") from None


def iter_documents(source: SourceConfig, stats: ReadStats | None = None) -> Iterator[str]:
    """Stream the documents of `source`, counting skipped units in `stats`.

    Raises SlmforgeError (one line, naming the path) if the source holds no document at all.
    """
    return iter(SourceReader(source, stats))


def documents_of(paths: list[str], say) -> Iterator[str]:
    """The documents of several sources (files, folders, globs), one after the other; a source's lines
    that are not UTF-8 are said when it has been read (skipped, never silently)."""
    for path in paths:
        stats = ReadStats()
        yield from iter_documents(SourceConfig(path=path), stats)
        if stats.skipped.get("invalid_utf8"):
            say(f"warning: skipped {path}: {stats.describe_skips()}")
