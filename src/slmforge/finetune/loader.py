"""Deterministic, resumable batches of fine-tuning examples, split across ranks.

Examples become rows: with packing, several examples share a row of up to `row_len` tokens (packed
once, best fit by decreasing length, so rows are nearly full), each token tagged with its example's
index so attention and positions restart per example; without packing, one example per row, padded
to the longest row of its batch. Each epoch visits every row once in an order fixed by (seed, epoch);
a global batch is the next batch_size x world_size rows and rank r takes the r-th block, so the state
is one global position (as in `data/loader.py`): a run resumes exactly on any number of processes.

`RowLoader` is that order and state; `ExampleLoader` (decoder examples) and `PairLoader`
(encoder-decoder translation pairs: one pair per row, source and target each padded to the longest
of the batch) differ only in how rows become a batch.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

from slmforge.data.loader import GlobalOrder
from slmforge.errors import SlmforgeError
from slmforge.finetune.templates import Encoded, EncodedPair
from slmforge.objectives.base import IGNORE_INDEX


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `row_len` tokens: best fit by decreasing length
    (each example goes to the fullest row it still fits in). Deterministic; O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = row_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return [sorted(row) for row in rows]


class RowLoader(GlobalOrder):
    """Rows of examples in the global order of `data/loader.py`; subclasses make batches of rows."""

    def __init__(self, rows: list[list[int]], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, training: bool = True, examples: int = 0):
        self.rows = rows
        self.num_windows = len(self.rows)  # the name the trainer's resume check reads
        self._start(batch_size, seed, shuffle, rank, world_size)
        needed = self.global_batch if training else 1
        if self.num_windows < needed:
            raise SlmforgeError(f"{examples} examples make {self.num_windows} rows, fewer than a global batch "
                                f"of {needed}; lower train.batch_size or add examples")

    def load_state_dict(self, state: dict[str, Any], allow_changes: bool = False) -> None:
        self._restore(state, state["consumed"], allow_changes,
                      f"data loader state is for {state['num_windows']} rows, this run has {self.num_windows}; "
                      f"the examples, train.seq_len or packing changed since the checkpoint")


class ExampleLoader(RowLoader):
    """Decoder examples: packed or padded rows of `tokens` with the `scored` answer positions."""

    def __init__(self, examples: list[Encoded], row_len: int, batch_size: int, *, packing: bool, pad_id: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, training: bool = True):
        too_long = [e for e in examples if len(e.ids) > row_len]
        if too_long:
            raise SlmforgeError(f"{too_long[0].where}: {len(too_long[0].ids)} tokens, longer than a row of {row_len}")
        self.examples = examples
        self.packing, self.pad_id = packing, pad_id
        rows = (pack_rows([len(e.ids) for e in examples], row_len) if packing
                else [[i] for i in range(len(examples))])
        super().__init__(rows, batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                         training=training, examples=len(examples))

    @property
    def fill(self) -> float:
        """Share of row positions that hold example tokens (1.0 = no padding at all)."""
        longest = max(sum(len(self.examples[i].ids) for i in row) for row in self.rows)
        used = sum(len(e.ids) for e in self.examples)
        return used / (len(self.rows) * longest)

    def _batch(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        lengths = [sum(len(self.examples[i].ids) for i in self.rows[r]) for r in rows]
        width = max(lengths)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        scored = np.zeros((len(rows), width), dtype=bool)
        documents = np.full((len(rows), width), -1, dtype=np.int64)
        for b, r in enumerate(rows):
            at = 0
            for i in self.rows[r]:
                example = self.examples[i]
                n = len(example.ids)
                tokens[b, at:at + n], scored[b, at:at + n], documents[b, at:at + n] = example.ids, example.scored, i
                at += n
        raw = {"tokens": torch.from_numpy(tokens), "scored": torch.from_numpy(scored),
               "sample_ids": torch.from_numpy(epoch * self.num_windows + rows.astype(np.int64))}
        if self.packing:
            raw["document_ids"] = torch.from_numpy(documents)
        else:
            raw["attention_mask"] = torch.from_numpy((documents >= 0).astype(np.int64))
        return raw

    def _unscored(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "scored": torch.zeros_like(batch["scored"])}


class PairLoader(RowLoader):
    """Encoder-decoder translation pairs, one per row: the raw batch holds the sources (`tokens`, padded
    with pad_id, `attention_mask`) and the targets (`target_tokens`, padded with -100), each as wide as
    its longest in the batch. Packing does not apply (a source attends to all of itself).

    Padding is kept small by bucketing, as translation toolkits do: the epoch's shuffled order is cut
    into chunks of BUCKET_BATCHES global batches, each chunk is sorted by length and cut into global
    batches, and those batches are shuffled. The order depends on (seed, epoch) only, so the position
    in it is still the whole loader state: resume and rank split work as for every RowLoader."""

    BUCKET_BATCHES = 50

    def __init__(self, pairs: list[EncodedPair], batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, training: bool = True):
        self.examples = pairs
        self.pad_id = pad_id
        super().__init__([[i] for i in range(len(pairs))], batch_size, seed=seed, shuffle=shuffle, rank=rank,
                         world_size=world_size, training=training, examples=len(pairs))

    @property
    def fill(self) -> float:
        """Share of source and target positions that hold tokens in one epoch's batches."""
        used = padded = 0
        order = self._epoch_order()
        for start in range(0, self.num_windows - self.batch_size + 1, self.batch_size):
            pairs = [self.examples[i] for i in order[start:start + self.batch_size]]
            used += sum(len(p.source) + len(p.target) for p in pairs)
            padded += len(pairs) * (max(len(p.source) for p in pairs) + max(len(p.target) for p in pairs))
        return used / max(padded, 1)

    def _epoch_order(self) -> np.ndarray:
        if self._order is not None or not self.shuffle:
            return super()._epoch_order()
        order = super()._epoch_order()
        size = self.global_batch
        chunk = size * self.BUCKET_BATCHES
        lengths = np.array([len(p.source) + len(p.target) for p in self.examples])
        batches = []
        for start in range(0, len(order) - len(order) % size, chunk):
            part = order[start:min(start + chunk, len(order) - len(order) % size)]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i:i + size] for i in range(0, len(part), size)]
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        # Rows that make no whole global batch stay last: an epoch never reaches them (as before).
        self._order = np.concatenate(batches + [order[len(order) - len(order) % size:]]).astype(np.int64)
        return self._order

    def _batch(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        pairs = [self.examples[self.rows[r][0]] for r in rows]
        sources = np.full((len(pairs), max(len(p.source) for p in pairs)), self.pad_id, dtype=np.int64)
        mask = np.zeros(sources.shape, dtype=np.int64)
        targets = np.full((len(pairs), max(len(p.target) for p in pairs)), IGNORE_INDEX, dtype=np.int64)
        for b, pair in enumerate(pairs):
            sources[b, :len(pair.source)], mask[b, :len(pair.source)] = pair.source, 1
            targets[b, :len(pair.target)] = pair.target
        return {"tokens": torch.from_numpy(sources), "attention_mask": torch.from_numpy(mask),
                "target_tokens": torch.from_numpy(targets),
                "sample_ids": torch.from_numpy(epoch * self.num_windows + rows.astype(np.int64))}

    def _unscored(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "target_tokens": torch.full_like(batch["target_tokens"], IGNORE_INDEX)}
