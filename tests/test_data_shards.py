"""Shard writer: bulk appends equal per-document appends, and a resumed writer cuts back to its state."""

from __future__ import annotations

import numpy as np
import pytest

from slmforge.data.shards import FORMAT, ShardSet, ShardWriter, dtype_for_vocab
from slmforge.errors import SlmforgeError
from slmforge.fileio import write_json_atomic


def documents(seed: int, n: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 40))) for _ in range(n)]


def finish(folder, writer: ShardWriter, dtype, vocab: int) -> None:
    manifest = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                "splits": {"train": {"shards": [vars(s) for s in writer.close()]}}}
    write_json_atomic(folder / "manifest.json", manifest)


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("vocab", [300, 70_000])
def test_add_many_equals_add_and_round_trips(tmp_path, vocab):
    dtype = dtype_for_vocab(vocab)
    assert dtype == (np.uint16 if vocab <= 2**16 else np.uint32)
    docs = documents(0, 500, vocab)
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    w = ShardWriter(one, "train", dtype, shard_tokens=333)
    for d in docs:
        w.add(d, text_bytes=len(d) * 3)
    finish(one, w, dtype, vocab)
    w = ShardWriter(many, "train", dtype, shard_tokens=333)
    for chunk in np.array_split(np.arange(len(docs)), 17):  # uneven chunks crossing shard ends
        part = [docs[i] for i in chunk]
        w.add_many(np.concatenate(part), [len(d) for d in part], [len(d) * 3 for d in part])
    finish(many, w, dtype, vocab)
    assert folder_bytes(one) == folder_bytes(many)
    data = ShardSet(many, "train")
    assert data.num_tokens == sum(len(d) for d in docs)
    assert data.num_bytes == 3 * data.num_tokens
    np.testing.assert_array_equal(data.read(0, data.num_tokens), np.concatenate(docs))
    if vocab > 2**16:
        assert int(data.read(0, data.num_tokens).max()) >= 2**16  # ids past uint16 survive


def test_resumed_writer_truncates_to_its_state(tmp_path):
    dtype = np.dtype(np.uint16)
    docs = documents(1, 200, 1000)
    straight = tmp_path / "straight"
    straight.mkdir()
    w = ShardWriter(straight, "train", dtype, shard_tokens=250)
    for d in docs:
        w.add(d, 1)
    finish(straight, w, dtype, 1000)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    w = ShardWriter(resumed, "train", dtype, shard_tokens=250)
    for d in docs[:90]:
        w.add(d, 1)
    w.sync()
    state = w.state()
    for d in docs[90:130]:  # written after the checkpoint, then "crashed": must be undone
        w.add(d, 1)
    w._file.flush()
    w = ShardWriter.resume(resumed, "train", dtype, 250, state)
    for d in docs[90:]:
        w.add(d, 1)
    finish(resumed, w, dtype, 1000)
    assert folder_bytes(straight) == folder_bytes(resumed)


def test_ids_outside_the_vocabulary_are_refused_when_opened(tmp_path):
    """Garbage of the right size (a damaged copy) used to surface as an embedding's `IndexError`."""
    dtype = np.dtype(np.uint16)
    w = ShardWriter(tmp_path, "train", dtype, shard_tokens=100)
    for d in documents(2, 30, 500):
        w.add(d, 1)
    finish(tmp_path, w, dtype, 500)
    assert ShardSet(tmp_path, "train").num_tokens > 0
    shard = tmp_path / "train-00001.bin"
    body = bytearray(shard.read_bytes())
    body[10:12] = (60_000).to_bytes(2, "little")  # token 5 of the second shard
    shard.write_bytes(bytes(body))
    with pytest.raises(SlmforgeError, match=r"train-00001\.bin: token id 60000 at or above the vocabulary "
                                            r"size 500 \(first at token 5\); shard is corrupt"):
        ShardSet(tmp_path, "train")
