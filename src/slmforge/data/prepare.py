"""`data prepare`: raw text sources -> token shards + manifest, on all cores, resumable.

    sources --SourceReader--> Interleaver (mixture order) --batches--> EncoderPool (workers)
            --in order--> train/val ShardWriters --> manifest.json

A single source of uncompressed text/JSONL files (one big file, say) takes another road to the same
bytes: the parent only plans byte ranges cut where a unit starts (`SourceReader.ranges`), each worker
reads its own ranges and tokenizes them, and the parent counts what they read, in order, as if it had
read it (`SourceReader.count_range`), so checkpoints and the manifest are those of the other road. No
text crosses a pipe and the parent does no work per document, so it keeps up with many more workers.
Several sources are mixed document by document, so they are read here and sent as texts; so is a
source with compressed, Parquet or dataset input (a compressed stream cannot be entered mid-file).

The output depends only on the config and the tokenizer: not on the number of workers, nor on where
a run was interrupted (a rerun resumes from `progress.json` and writes the same bytes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmforge import config
from slmforge.config import require
from slmforge.data.encode import (
    DocumentEncoder,
    EncodedBatch,
    EncoderPool,
    default_workers,
    tokenizer_info,
)
from slmforge.text.mixture import (
    Interleaver,
    MixtureConfig,
    mixture_probabilities,
    needs_sizes,
    source_sizes,
)
from slmforge.data.progress import Progress
from slmforge.data.resume import (
    PROGRESS,
    check_inputs,
    fingerprint,
    input_files,
    open_output,
    save_progress,
)
from slmforge.data.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    dtype_for_vocab,
)
from slmforge.text.sources import RangeJob, ReadStats, SourceReader, UnreadableFile
from slmforge.fileio import relative_to, write_json_atomic

SECTION = "data"
SPLITS = ("train", "val")
BATCH_DOCUMENTS = 1024     # a batch closes at this many documents...
BATCH_CHARS = 1 << 20      # ...or this many characters: big enough to amortize IPC, small in memory
RANGE_BYTES = 1 << 20      # a worker's job when it reads a single source's files itself (same reasons),
                           # smaller (down to 1/16) when that would leave fewer than 4 jobs per worker
CHECKPOINT_SECONDS = 60.0  # besides after every finished shard


@dataclass
class DataConfig(MixtureConfig):
    """The `[data]` section: which text to tokenize, with what, into which folder."""

    tokenizer: str = ""
    """Tokenizer folder (tokenizer.json + tokenizer_config.json), e.g. from `slmforge tokenizer train`."""
    out: str = "data"
    """Output folder for shards and manifest.json; rerunning the same command resumes into it."""
    val_fraction: float = 0.01
    """Share of documents held out for validation, chosen by a seeded hash of each document's text."""
    val_documents: int | None = None
    """Instead of val_fraction: hold out exactly this many documents, the first of the mixed stream."""
    shard_tokens: int = 2**26
    """A shard is closed once it holds this many tokens (documents never straddle shards)."""
    workers: int = 0
    """Tokenizer processes; 0 = all cores. The output does not depend on it."""
    add_bos: bool = True
    """Start every document with the tokenizer's bos token (when it has one); eos always ends it."""
    piece_chars: int = 1_000_000
    """A longer document is tokenized in pieces of at most this many characters (cut before a space or
    newline, else between letter clusters) and stored as one document: tokenizing a 50 MB line whole
    takes gigabytes. Text near a cut may tokenize slightly differently from an uncut text."""
    max_invalid_utf8: float = 0.5
    """Fail when more than this share of a file's lines (records, rows) is not UTF-8: such a file is
    binary or in another encoding. Below it, bad units are skipped and counted. 1 = never fail."""

    def validate(self) -> None:
        super().validate()
        require(bool(self.tokenizer), "tokenizer", "required: a tokenizer folder (--tokenizer DIR)")
        require(bool(self.out), "out", "required: an output folder (--out DIR)")
        require(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.val_documents is None or self.val_documents >= 0, "val_documents",
                f"must be >= 0, got {self.val_documents}")
        require(self.shard_tokens > 0, "shard_tokens", f"must be positive, got {self.shard_tokens}")
        require(self.workers >= 0, "workers", f"must be >= 0 (0 = all cores), got {self.workers}")
        require(self.piece_chars >= 1024, "piece_chars", f"must be >= 1024, got {self.piece_chars}")
        require(0 <= self.max_invalid_utf8 <= 1, "max_invalid_utf8",
                f"must be in [0, 1], got {self.max_invalid_utf8}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> DataConfig:
    """The `[data]` section of a recipe, then `flags` (e.g. from --input/--out), then `data.*` overrides."""
    return config.load_section(DataConfig, SECTION, path, overrides, flags)


def recorded_config(cfg: DataConfig) -> dict[str, Any]:
    """The config as the manifest records it: what shapes the bytes (no out, workers, tokenizer path,
    nor the failure threshold for non-UTF-8 files: a run that passes it writes the same bytes)."""
    data = config.to_dict(cfg)
    for key in ("out", "workers", "tokenizer", "max_invalid_utf8"):
        data.pop(key, None)
    return data


def prepare_data(cfg: DataConfig, show_progress: bool = True) -> Path:
    """Tokenize `cfg.sources` into `cfg.out` and return that folder (see the module docstring)."""
    return _Preparation(cfg, show_progress).run()


class _Preparation:
    """One run of prepare_data: its readers, writers and counters, and their checkpoints."""

    def __init__(self, cfg: DataConfig, show_progress: bool):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.log = Progress("prepare", enabled=show_progress)
        self.tokenizer = tokenizer_info(cfg.tokenizer)
        self.dtype = dtype_for_vocab(self.tokenizer.vocab_size)
        self.identity = {"config": recorded_config(cfg), "tokenizer_sha256": self.tokenizer.sha256}

    def run(self) -> Path:
        existed = self.out.exists()
        status, saved = open_output(self.out, self.identity)
        if status == "done":
            self.log.note(f"{self.out} is already prepared with this config; nothing to do")
            return self.out
        saved = saved or {}
        self.documents = int(saved.get("documents", 0))
        try:
            self._open_sources(saved)
            self._open_writers(saved)
            if status == "resume":
                self.log.note(f"resuming {self.out} after {int(self.drawn[:, 0].sum()):,} documents")
            else:
                self._save(self._snapshot())  # marks the folder as ours before any shard exists
            self._tokenize()
        except KeyboardInterrupt:
            self.log.note("interrupted; rerun the same command to resume from the last checkpoint")
            raise
        except Exception as error:
            # Nothing worth resuming (no document yet, or a file refused whole: the fixed file is another
            # input, which a resume would refuse): leave the folder as it was found.
            if not self.documents or isinstance(error, UnreadableFile):
                self._discard(remove_folder=not existed)
            raise
        self._finish()
        return self.out

    def _discard(self, remove_folder: bool) -> None:
        """Remove what a failed run left (progress.json, shards), so that a rerun after fixing the input
        (an empty corpus, a binary file) starts afresh instead of refusing the changed input."""
        for writer in getattr(self, "writers", {}).values():
            writer.close()
        for stale in self.out.glob("*-[0-9][0-9][0-9][0-9][0-9].bin"):
            stale.unlink()
        (self.out / PROGRESS).unlink(missing_ok=True)
        if remove_folder and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    # -- setup

    def _open_sources(self, saved: dict[str, Any]) -> None:
        cfg = self.cfg
        stats = saved.get("stats") or [None] * len(cfg.sources)
        cursors = saved.get("cursors") or [None] * len(cfg.sources)
        self.readers = [SourceReader(s, ReadStats.from_dict(st) if st else None, cur,
                                     max_invalid_share=cfg.max_invalid_utf8, say=self.log.note)
                        for s, st, cur in zip(cfg.sources, stats, cursors)]
        self.inputs = input_files(self.readers)
        if saved:
            check_inputs(self.out, saved["inputs"], self.inputs)
        self.sizes = saved.get("sizes")
        if self.sizes is None and needs_sizes(cfg):
            self.log.note("counting documents per source for the mixture shares")
            self.sizes = source_sizes(cfg.sources)
        self.probabilities = mixture_probabilities(cfg, self.sizes)
        self.interleaver = Interleaver(self.readers, self.probabilities, cfg.seed, cfg.stop,
                                       saved.get("interleaver"))
        # Decided by the sources alone (never by the worker count), so a resumed run takes the same path.
        self.by_range = len(self.readers) == 1 and self.readers[0].reads_by_range()
        # Per source: documents, tokens, UTF-8 bytes drawn so far.
        self.drawn = np.array(saved.get("drawn") or [[0, 0, 0]] * len(cfg.sources), dtype=np.int64)
        self.documents = int(saved.get("documents", 0))

    def _open_writers(self, saved: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        states = saved.get("writers", {})
        self.writers = {
            split: (ShardWriter.resume(self.out, split, self.dtype, self.cfg.shard_tokens, states[split])
                    if split in states else ShardWriter(self.out, split, self.dtype, self.cfg.shard_tokens))
            for split in SPLITS
        }

    # -- the loop

    def _jobs(self) -> Iterator[tuple[Any, list[str] | RangeJob]]:
        """(tag, work) for the encoder pool in stream order: byte ranges the workers read themselves
        (the tag is the job, counted when its result is back), or batches of texts read here."""
        if self.by_range:
            reader = self.readers[0]
            left = reader.total_bytes() - reader.consumed_bytes()
            for job in reader.ranges(min(RANGE_BYTES, max(RANGE_BYTES // 16, left // (4 * self.workers)))):
                yield job, job
        else:
            yield from self._batches()

    def _count_read(self, tag: Any, batch: EncodedBatch) -> tuple[np.ndarray, dict[str, Any]]:
        """(source indices, state after the batch) of a finished job: a text batch carries them; a range
        job's reading is counted now, in order, as if this process had read it."""
        if not isinstance(tag, RangeJob):
            return tag
        reader = self.readers[0]
        for part, (stats, lines) in zip(tag.ranges, batch.read):
            reader.count_range(part, stats, lines)
        self.interleaver.drawn_elsewhere(len(batch.lengths))
        return np.zeros(len(batch.lengths), dtype=np.int64), self._snapshot()

    def _batches(self) -> Iterator[tuple[Any, list[str]]]:
        """(source indices, position after the batch), texts: batches in mixture order."""
        sources: list[int] = []
        texts: list[str] = []
        chars = 0
        for index, text in self.interleaver:
            sources.append(index)
            texts.append(text)
            chars += len(text)
            if len(texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
                yield (np.array(sources, dtype=np.int64), self._snapshot()), texts
                sources, texts, chars = [], [], 0
        if texts:
            yield (np.array(sources, dtype=np.int64), self._snapshot()), texts

    def _snapshot(self) -> dict[str, Any]:
        return {"interleaver": self.interleaver.state(),
                "cursors": [r.cursor() for r in self.readers],
                "stats": [r.stats.snapshot() for r in self.readers]}

    def _tokenize(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        by_hash = cfg.val_documents is None
        encoder = DocumentEncoder(cfg.tokenizer, tok.bos_id if cfg.add_bos else None, tok.eos_id,
                                  self.dtype.name, cfg.val_fraction if by_hash else 0.0, cfg.seed,
                                  piece_chars=cfg.piece_chars)
        sizes = [r.total_bytes() for r in self.readers]
        self.log.total_bytes = sum(s for s in sizes if s is not None) if None not in sizes else None
        shards_done = self._finished_shards()
        last_save = time.monotonic()
        self.workers = cfg.workers or default_workers()
        with EncoderPool(encoder, self.workers) as pool:
            for tag, batch in pool.map(self._jobs()):
                sources, snapshot = self._count_read(tag, batch)
                if by_hash:
                    held_out = batch.held_out
                else:  # the first val_documents documents of the stream
                    held_out = np.arange(self.documents, self.documents + len(sources)) < cfg.val_documents
                self._write(batch.tokens, batch.lengths, batch.text_bytes, held_out)
                n = len(self.readers)
                self.drawn[:, 0] += np.bincount(sources, minlength=n)
                for column, values in ((1, batch.lengths), (2, batch.text_bytes)):
                    per_source = np.bincount(sources, weights=values, minlength=n)
                    self.drawn[:, column] += per_source.astype(np.int64)
                self.documents += len(sources)
                finished = self._finished_shards()
                if finished > shards_done or time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                    self._save(snapshot)
                    shards_done, last_save = finished, time.monotonic()
                self.log.update(self.documents, int(self.drawn[:, 1].sum()), int(self.drawn[:, 2].sum()),
                                sum(r.consumed_bytes() for r in self.readers),
                                new_text_bytes=int(batch.text_bytes.sum()))
        if self.by_range:  # the end of the source, as iterating it would have found it
            self.readers[0].require_documents()
            self.interleaver.drawn_elsewhere(0, finished=True)

    def _write(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray,
               held_out: np.ndarray) -> None:
        token_held_out = np.repeat(held_out, lengths)  # (tokens,) which split each token goes to
        for split, docs, toks in (("train", ~held_out, ~token_held_out), ("val", held_out, token_held_out)):
            if docs.any():
                self.writers[split].add_many(tokens[toks], lengths[docs], text_bytes[docs])

    def _finished_shards(self) -> int:
        return sum(len(w.shards) for w in self.writers.values())

    def _save(self, snapshot: dict[str, Any]) -> None:
        for writer in self.writers.values():
            writer.sync()  # the bytes a checkpoint counts must be on disk before it is
        save_progress(self.out, {
            "fingerprint": fingerprint(self.identity), "identity": self.identity,
            "inputs": self.inputs, "sizes": self.sizes, **snapshot,
            "drawn": self.drawn.tolist(), "documents": self.documents,
            "writers": {split: w.state() for split, w in self.writers.items()},
        })

    # -- the end

    def _finish(self) -> None:
        splits = {}
        for split, writer in self.writers.items():
            shards = [dataclasses.asdict(s) for s in writer.close()]
            splits[split] = {"shards": shards, **{k: sum(s[k] for s in shards)
                                                  for k in ("tokens", "documents", "bytes")}}
        manifest = self._manifest(splits)
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        train, val = splits["train"], splits["val"]
        skipped = manifest["skipped"]
        self.log.finish(
            f"{train['documents']:,} train documents ({train['tokens']:,} tokens, {len(train['shards'])} "
            f"shards), {val['documents']:,} val ({val['tokens']:,} tokens); skipped "
            + (", ".join(f"{n:,} {r}" for r, n in skipped.items()) or "nothing") + f"; wrote {self.out}")
        if val["documents"] == 0 and (self.cfg.val_documents or self.cfg.val_fraction):
            self.log.note("warning: the val split is empty (corpus too small for val_fraction?); "
                          "set val_documents")

    def _manifest(self, splits: dict[str, Any]) -> dict[str, Any]:
        cfg, tok = self.cfg, self.tokenizer
        skipped: dict[str, int] = {}
        sources = []
        for i, (source, reader) in enumerate(zip(cfg.sources, self.readers)):
            stats = reader.stats
            for reason, n in stats.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            disk = {str(p): size for p, size in zip(reader.files, reader.file_sizes)}
            sources.append({
                "path": source.path, "lang": source.lang, "weight": source.weight,
                "probability": self.probabilities[i],
                "size_documents": self.sizes[i] if self.sizes else None,
                "drawn": dict(zip(("documents", "tokens", "bytes"), map(int, self.drawn[i]))),
                "exhausted": i in self.interleaver.exhausted,
                "skipped": dict(sorted(stats.skipped.items())),
                "files": [{"path": name, "disk_bytes": disk.get(name), **entry}
                          for name, entry in stats.files.items()],
            })
        bos = tok.bos_id if cfg.add_bos else None
        return {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": tok.vocab_size,
            # relative to this folder: the data and its tokenizer work from anywhere and move together
            "tokenizer": {"path": relative_to(tok.path, self.out), "sha256": tok.sha256},
            "bytes_counted": "UTF-8 bytes of the text the tokens encode: after the tokenizer's normalization "
                             "(" + (self.tokenizer.normalization or "none") + ")",
            "document_layout": ("[bos] " if bos is not None else "") + "tokens eos",
            "bos_id": bos,  # null when documents carry no bos
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "config": self.identity["config"],
            "config_sha256": fingerprint(self.identity),
            "sources": sources,
            "skipped": dict(sorted(skipped.items())),
            "splits": splits,
        }

