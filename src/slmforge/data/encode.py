"""Tokenizing documents on all cores, in order.

Worker processes each load the tokenizer once and turn a batch of documents into one flat token array
(`[bos] ids eos` per document) plus per-document lengths, UTF-8 sizes and validation flags. A batch
is sent as texts, or as a job the worker reads itself (byte ranges of a file: the text then never
crosses a pipe). Results come back in submission order, so the output never depends on how many
workers ran. At most a few batches are in flight, which bounds memory whatever the corpus size.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import signal
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmforge.errors import SlmforgeError
from slmforge.text.sampling import split_long
from slmforge.tokenizer import load_tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """What the shards need to know about a tokenizer."""

    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int  # documents need a separator; tokenizer_info refuses a tokenizer without one
    sha256: str
    pad_id: int | None = None  # RoBERTa-style encoders number positions from it
    normalization: str = ""    # the text-changing normalizer steps, e.g. "NFC" ("" for none)


def tokenizer_info(path: str | Path) -> TokenizerInfo:
    """Load the tokenizer once in this process to read its ids and hash; the shards need an eos."""
    tokenizer = load_tokenizer(path)
    if tokenizer.eos_id is None:
        raise SlmforgeError(f"{path}: tokenizer has no eos token; documents need one as separator "
                            "(name eos_token in tokenizer_config.json)")
    return TokenizerInfo(str(path), tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                         tokenizer.sha256, tokenizer.pad_id,
                         " + ".join(step["type"] for step in _text_steps(tokenizer)))


@dataclass
class EncodedBatch:
    """A batch of documents as shard-ready tokens."""

    tokens: np.ndarray      # (sum of lengths,) every document's `[bos] ids eos`, back to back
    lengths: np.ndarray     # (documents,) int64 tokens per document, specials included
    text_bytes: np.ndarray  # (documents,) int64 UTF-8 bytes of the text the tokens encode (normalized)
    held_out: np.ndarray    # (documents,) bool: goes to the validation split by its text hash
    read: Any = None        # what a job that read its own texts counted (see `DocumentEncoder.encode`)


class DocumentEncoder:
    """Documents -> EncodedBatch. One per process; picklable settings, tokenizer loaded lazily."""

    def __init__(self, tokenizer_path: str, bos_id: int | None, eos_id: int, dtype: str,
                 val_fraction: float, seed: int, piece_chars: int = 1_000_000):
        self.tokenizer_path = tokenizer_path
        # A longer document is tokenized in pieces of at most this many characters (one document still):
        # the tokenizer's working memory is ~80 bytes per character, 4 GB for a 50 MB line.
        self.piece_chars = piece_chars
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        # A document is held out when a keyed hash of its text falls below this threshold: the split
        # is seeded, independent of order and workers, and exact duplicates land on the same side.
        self.threshold = int(val_fraction * 2**64)
        self.hash_key = str(seed).encode()
        self._tokenizer: Any = None
        self._normalizer: Any = None
        self._form: str | None = None

    def __call__(self, texts: list[str]) -> EncodedBatch:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path).treat_special_strings_as_text()
            self._normalizer = text_normalizer(self._tokenizer)
            steps = [step["type"] for step in _text_steps(self._tokenizer)]
            # One Unicode form: most text already is in it, which Python checks fast (no copy).
            self._form = steps[0] if len(steps) == 1 and steps[0] in ("NFC", "NFD", "NFKC", "NFKD") else None
        # Documents as pieces (one piece unless longer than piece_chars), encoded in groups of about
        # PIECE_GROUP_CHARS so that neither the tokenizer nor the id lists grow with the longest document.
        pieces = [(i, piece) for i, text in enumerate(texts) for piece in split_long(text, self.piece_chars)]
        chunks: list[np.ndarray] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        head = [] if self.bos_id is None else [self.bos_id]
        start = 0
        while start < len(pieces):
            end, chars = start, 0
            while end < len(pieces) and (end == start or chars + len(pieces[end][1]) <= PIECE_GROUP_CHARS):
                chars += len(pieces[end][1])
                end += 1
            group = pieces[start:end]
            flat: list[int] = []
            for k, ((doc, piece), ids) in enumerate(zip(group, self._tokenizer.encode_batch([p for _, p in group]))):
                first = start + k == 0 or pieces[start + k - 1][0] != doc
                last = start + k + 1 == len(pieces) or pieces[start + k + 1][0] != doc
                if first:
                    flat.extend(head)
                flat.extend(ids)
                if last:
                    flat.append(self.eos_id)
                lengths[doc] += len(ids) + (len(head) if first else 0) + (1 if last else 0)
            chunks.append(np.array(flat, dtype=self.dtype))
            start = end
        encoded = [t.encode("utf-8") for t in texts]
        text_bytes = np.fromiter((self._text_bytes(t, b) for t, b in zip(texts, encoded)), dtype=np.int64,
                                 count=len(texts))
        if self.threshold:
            held_out = np.fromiter(
                (int.from_bytes(hashlib.blake2b(b, digest_size=8, key=self.hash_key).digest(),
                                "little") < self.threshold for b in encoded),
                dtype=bool, count=len(texts))
        else:
            held_out = np.zeros(len(texts), dtype=bool)
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=self.dtype)
        return EncodedBatch(tokens, lengths, text_bytes, held_out)

    def encode(self, work: list[str] | Any) -> EncodedBatch:
        """A batch of texts, or a job that reads its own (`work.read()` -> texts and what reading them
        counted, e.g. text.sources.RangeJob), as one EncodedBatch; the job's counts ride along in `.read`."""
        if isinstance(work, list):
            return self(work)
        texts, counted = work.read()
        batch = self(texts)
        batch.read = counted
        return batch

    def _text_bytes(self, text: str, encoded: bytes) -> int:
        """UTF-8 bytes of `text` as the tokenizer normalizes it (`encoded` is its raw UTF-8): bits per
        byte divides by the text the model was trained on."""
        if self._normalizer is None or (self._form is not None and unicodedata.is_normalized(self._form, text)):
            return len(encoded)
        return sum(len(self._normalizer.normalize_str(piece).encode("utf-8"))
                   for piece in split_long(text, self.piece_chars))


PIECE_GROUP_CHARS = 1 << 20

# Normalizer steps that change the text itself; the others (Replace " " -> "▁", Prepend "▁", Strip)
# only change how whitespace is spelled inside the tokenizer and would inflate the byte count.
_TEXT_STEPS = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Precompiled", "BertNormalizer")


def text_normalizer(tokenizer) -> Any:
    """The part of a tokenizer's normalizer that changes the text (Unicode normalization, lowercasing,
    accent stripping), or None when it has none: what `bytes` in a manifest and bits per byte in eval
    count is the UTF-8 of that text, the text the tokens actually encode."""
    import base64

    from tokenizers import normalizers

    kept = []
    for step in _text_steps(tokenizer):
        kind = step["type"]
        if kind == "Precompiled":
            kept.append(normalizers.Precompiled(base64.b64decode(step["precompiled_charsmap"])))
        elif kind == "BertNormalizer":  # without the spaces it puts around CJK characters
            kept.append(normalizers.BertNormalizer(clean_text=step.get("clean_text", True),
                                                   handle_chinese_chars=False,
                                                   strip_accents=step.get("strip_accents"),
                                                   lowercase=step.get("lowercase", True)))
        else:
            kept.append(getattr(normalizers, kind)())
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else normalizers.Sequence(kept)


def _text_steps(tokenizer) -> list[dict[str, Any]]:
    import json

    spec = json.loads(tokenizer.backend.to_str()).get("normalizer")
    steps = spec.get("normalizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    return [step for step in steps if step.get("type") in _TEXT_STEPS]


def encoded_text_bytes(tokenizer, texts: Iterable[str]) -> int:
    """UTF-8 bytes of `texts` after the tokenizer's text normalization (see `text_normalizer`)."""
    normalizer = text_normalizer(tokenizer)
    if normalizer is None:
        return sum(len(t.encode("utf-8")) for t in texts)
    return sum(len(normalizer.normalize_str(t).encode("utf-8")) for t in texts)


_worker_encoder: DocumentEncoder | None = None


def _worker_init(encoder: DocumentEncoder) -> None:
    global _worker_encoder
    # Ctrl-C is the parent's to handle: it stops the pool and keeps the last checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    # One thread per worker: the processes already use every core, more threads would thrash.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def _die_with_parent() -> None:
    """Linux: be killed when the parent dies (kill -9, OOM). A worker waiting for its next batch would
    otherwise wait forever, holding the terminal's pipes open."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request took effect
        os._exit(1)


def _worker_encode(work: list[str] | Any) -> EncodedBatch:
    assert _worker_encoder is not None
    return _worker_encoder.encode(work)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class EncoderPool:
    """Runs a DocumentEncoder over batches on `workers` processes; `workers = 1` runs in-process
    (where the tokenizers library may still use its own threads).

    A worker that dies (killed, out of memory) breaks the pool: the next result raises one clear
    error instead of waiting forever for a batch no process will finish (multiprocessing.Pool would
    quietly replace the worker and hang)."""

    def __init__(self, encoder: DocumentEncoder, workers: int):
        self.encoder = encoder
        self.workers = workers
        self._pool = None
        if workers > 1:
            # fork on Linux: fast to start and no `if __name__ == "__main__"` needed in user scripts
            # (spawn re-imports the main module). Workers touch only tokenizers and numpy, never
            # locks a parent thread could hold. macOS and Windows fork unsafely or not at all.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            # Children inherit this, which also silences tokenizers' "forked after parallelism" note.
            previous = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                 initargs=(encoder,))
                # With fork, the pool starts all its workers at the first task, from this (the main)
                # thread: do it now, while the environment above is set for them to inherit.
                self._pool.submit(os.getpid).result()
            finally:
                if previous is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = previous

    def map(self, jobs: Iterable[tuple[Any, list[str] | Any]]) -> Iterator[tuple[Any, EncodedBatch]]:
        """(tag, texts or a job that reads its own: see `DocumentEncoder.encode`) -> (tag, EncodedBatch),
        in order, with a bounded number in flight."""
        if self._pool is None:
            for tag, work in jobs:
                yield tag, self.encoder.encode(work)
            return
        pending: collections.deque = collections.deque()
        for tag, work in jobs:
            pending.append((tag, self._submit(work)))
            if len(pending) >= 2 * self.workers:
                tag0, result = pending.popleft()
                yield tag0, self._result(result)
        while pending:
            tag0, result = pending.popleft()
            yield tag0, self._result(result)

    def _submit(self, work: list[str] | Any):
        try:
            return self._pool.submit(_worker_encode, work)
        except BrokenProcessPool:
            raise _worker_died() from None

    def _result(self, future) -> EncodedBatch:
        try:
            return future.result()
        except BrokenProcessPool:
            raise _worker_died() from None

    def close(self) -> None:
        """Let the workers finish what is in flight (at most 2 x workers batches) and exit; after a
        worker died, stop the others without waiting for work nobody will collect."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _worker_died() -> SlmforgeError:
    return SlmforgeError("data prepare: an encoding worker process died (killed, or out of memory?); the shards "
                         "finished so far are kept: run the same command to resume (data.workers fewer if memory "
                         "ran out)")
