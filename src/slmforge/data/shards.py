"""Token shards on disk: flat little-endian uint16/uint32 files plus a JSON manifest.

Layout of a prepared data folder:

    data/
      manifest.json          # format, dtype, vocab size, tokenizer hash, per-split files and counts
      train-00000.bin ...    # documents back to back, each `[bos] tokens eos`
      val-00000.bin ...

Readers memory-map the files, so a corpus larger than RAM trains without loading it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmforge.errors import SlmforgeError
from slmforge.fileio import inside, read_json

FORMAT = "slmforge-shards/1"
MANIFEST = "manifest.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; larger vocabularies (e.g. Gemma's 262k) need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SlmforgeError(f"{path}: no manifest; run `slmforge data prepare` to make token shards")
    manifest = read_json(path, "; the data folder is damaged, prepare it again")
    if manifest.get("format") != FORMAT:
        raise SlmforgeError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def manifest_tokenizer_dir(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """The tokenizer folder a manifest names. `data prepare` records it relative to the data folder
    (so the pair works from anywhere and moves together); manifests written before that recorded it
    relative to the folder prepare ran in, tried second."""
    path = Path((manifest.get("tokenizer") or {}).get("path") or "")
    if not path.is_absolute():
        beside = Path(folder) / path
        path = beside if (beside / "tokenizer.json").exists() or not path.exists() else path
    return path.parent if path.is_file() else path


@dataclass
class ShardInfo:
    name: str
    tokens: int
    documents: int
    bytes: int  # UTF-8 bytes of the text these tokens encode (for bits per byte)


class ShardWriter:
    """Appends documents' tokens to numbered shard files of about `shard_tokens` tokens each."""

    def __init__(self, folder: str | Path, split: str, dtype: np.dtype, shard_tokens: int = 2**26,
                 first_index: int = 0):
        self.folder = Path(folder)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.index = first_index
        self.shards: list[ShardInfo] = []
        self._file = None
        self._current: ShardInfo | None = None

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        self.add_many(tokens, [len(tokens)], [text_bytes])

    def add_many(self, tokens: np.ndarray, lengths: Any, text_bytes: Any) -> None:
        """Append documents stored back to back in `tokens` (`lengths[i]` tokens each).

        Same files as one `add` per document: a shard is closed before the first document that
        finds it holding `shard_tokens` or more, so documents never straddle shards."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        text_bytes = np.asarray(text_bytes, dtype=np.int64)
        ends = np.cumsum(lengths)
        first, start = 0, 0
        while first < len(lengths):
            if self._current is None or self._current.tokens >= self.shard_tokens:
                self._roll()
            assert self._file is not None and self._current is not None
            # A document goes in while the shard holds < shard_tokens when it starts: the first one
            # always, then each whose start (the previous document's end) is below `room`.
            room = self.shard_tokens - self._current.tokens + start
            last = min(len(lengths), first + 1 + int(np.searchsorted(ends[first:], room, side="left")))
            end = int(ends[last - 1])
            self._file.write(tokens[start:end].tobytes())
            self._current.tokens += end - start
            self._current.documents += last - first
            self._current.bytes += int(text_bytes[first:last].sum())
            first, start = last, end

    def _roll(self) -> None:
        self._finish()
        name = self.shard_name(self.index)
        self.index += 1
        self._file = open(self.folder / name, "wb")
        self._current = ShardInfo(name, 0, 0, 0)

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:05d}.bin"

    def _finish(self) -> None:
        if self._file is not None and self._current is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.shards.append(self._current)
        self._file, self._current = None, None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    # -- resume: a writer's state is small JSON; the open shard is truncated back to it on resume

    def sync(self) -> None:
        """Make the open shard's bytes durable, so a state() taken now survives a crash."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> dict[str, Any]:
        """Finished shards, the open one and the next index; call sync() first for durability."""
        return {
            "index": self.index,
            "shards": [asdict(s) for s in self.shards],
            "current": asdict(self._current) if self._current is not None else None,
        }

    @classmethod
    def resume(cls, folder: str | Path, split: str, dtype: np.dtype, shard_tokens: int,
               state: dict[str, Any]) -> ShardWriter:
        """Reopen a writer at `state`: finished shards are kept, the open shard is cut back to the
        length recorded (a crash may have appended more), later shard files get overwritten."""
        writer = cls(folder, split, dtype, shard_tokens, first_index=int(state["index"]))
        writer.shards = [ShardInfo(**s) for s in state["shards"]]
        for shard in writer.shards:  # progress.json is read back: its names must stay in the folder
            inside(writer.folder, shard.name, f"progress names {split} shard")
        current = state["current"]
        if current is not None:
            if current.get("name") != writer.shard_name(writer.index - 1):
                raise SlmforgeError(f"{writer.folder}: progress names the open {split} shard "
                                    f"{str(current.get('name'))[:80]!r}, expected {writer.shard_name(writer.index - 1)!r}; "
                                    f"the progress file is damaged: delete the folder and prepare again")
            path = writer.folder / current["name"]
            length = int(current["tokens"]) * writer.dtype.itemsize
            if not path.is_file() or path.stat().st_size < length:
                found = path.stat().st_size if path.is_file() else "missing"
                raise SlmforgeError(f"{path}: expected at least {length} bytes to resume, found {found}")
            writer._file = open(path, "r+b")
            writer._file.truncate(length)
            writer._file.seek(length)
            writer._current = ShardInfo(**current)
        return writer


class ShardSet:
    """All shards of one split as one long, memory-mapped token sequence."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        splits = self.manifest["splits"]
        if split not in splits:
            raise SlmforgeError(f"{self.folder / MANIFEST}: no split {split!r} (have {', '.join(splits)})")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = int(self.manifest["vocab_size"])
        info = splits[split]
        self.arrays: list[np.ndarray] = []
        for shard in info["shards"]:
            path = inside(self.folder, shard.get("name"), f"{MANIFEST} names {split} shard")
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise SlmforgeError(f"{path}: expected {expected} bytes, found {size}; shard is corrupt")
            if expected:
                array = np.memmap(path, dtype=self.dtype, mode="r")
                # One pass over the file: garbage of the right size would otherwise surface much
                # later as an embedding lookup's "index out of range in self".
                largest = int(array.max())
                if largest >= self.vocab_size:
                    first = int(np.argmax(array >= self.vocab_size))
                    raise SlmforgeError(f"{path}: token id {largest} at or above the vocabulary size "
                                        f"{self.vocab_size} (first at token {first:,}); shard is corrupt")
                self.arrays.append(array)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])
        self.num_bytes = int(sum(int(s.get("bytes", 0)) for s in info["shards"]))

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(self.num_tokens, 1)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) outside {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start - int(self.offsets[shard])
        while filled < length:
            array = self.arrays[shard]
            take = min(length - filled, len(array) - pos)
            out[filled:filled + take] = array[pos:pos + take]
            filled += take
            shard, pos = shard + 1, 0
        return out
