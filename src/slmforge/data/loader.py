"""Deterministic, resumable batches of token windows from prepared shards, split across ranks.

The token stream is cut into windows starting every seq_len tokens, `window` tokens long: seq_len + 1
for causal LM (inputs and shifted targets overlap by one), seq_len for masked LM. The objective
decides (`window_tokens`) and turns the raw windows into inputs and targets.

Each epoch visits every window once in an order fixed by (seed, epoch). A global micro-batch is the
next batch_size x world_size windows of that order; rank r takes the r-th block of batch_size. So N
processes with batch B read exactly the windows one process with batch N x B reads, and the state is
one global number (windows consumed in the epoch): a run resumes on any number of processes.

Every window carries a sample id (epoch x windows + window): objectives seed their randomness (masks)
with it, so what a sample sees does not depend on the step, the rank or the number of processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slmforge.data.shards import ShardSet
from slmforge.errors import SlmforgeError


class GlobalOrder:
    """Items (windows, or fine-tuning rows) handed out in an order fixed by (seed, epoch), a global
    batch at a time, rank r taking the r-th block of batch_size; the state is one global position.
    Subclasses set `num_windows` (the item count) and make batches of items in `_batch`."""

    num_windows: int

    def _start(self, batch_size: int, seed: int, shuffle: bool, rank: int, world_size: int) -> None:
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        self.epoch = 0
        self.consumed = 0  # items of this epoch's order already handed out, by all ranks together
        self._order: np.ndarray | None = None

    def _batch(self, indices: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _unscored(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` scoring nothing (a filler past the end of an evaluation pass, for one rank)."""
        raise NotImplementedError

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_windows": self.num_windows, "global_batch": self.global_batch}

    def _restore(self, state: dict[str, Any], consumed: int, allow_changes: bool, refusal: str) -> None:
        """Continue where `state` left off. With `allow_changes` (train.allow_config_changes), another
        item count restarts the saved epoch instead of being refused with `refusal`."""
        if state["num_windows"] != self.num_windows:
            if not allow_changes:
                raise SlmforgeError(refusal)
            consumed = 0
        self.epoch, self.consumed, self.seed = state["epoch"], consumed, state["seed"]
        self._order = None

    # ------------------------------------------------------------ iteration

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
        return self._order

    def next_batch(self, rows: int | None = None) -> dict[str, torch.Tensor]:
        """This rank's next raw batch of `rows` items (default batch_size; fewer during a batch warmup,
        the same number on every rank): the global micro-batch is rows x world_size items and the
        position moves by just that, so no item is skipped. A new epoch starts when the current one
        has no full global micro-batch left."""
        rows = self.batch_size if rows is None else rows
        size = rows * self.world_size
        if self.consumed + size > self.num_windows:
            self.epoch += 1
            self.consumed = 0
            self._order = None
        start = self.consumed + self.rank * rows
        indices = self._epoch_order()[start:start + rows]
        self.consumed += size
        return self._batch(indices, self.epoch)

    def epoch_batches(self, limit: int | None = None):
        """One pass in fixed order (for evaluation), `limit` global batches at most; does not touch the
        training state. As in training, rank r takes the r-th block of each global batch, so every
        number of processes evaluates the same items."""
        count = -(-self.num_windows // self.global_batch)  # the last global batch may be short
        if limit is not None:
            count = min(count, limit)
        for b in range(count):
            start = b * self.global_batch + self.rank * self.batch_size
            indices = np.arange(start, min(start + self.batch_size, self.num_windows))
            if len(indices):
                yield self._batch(indices, 0)
            else:
                # Past the end for this rank but not for others: a batch that scores nothing, so every
                # rank runs the same number of forward passes (their collectives must pair up).
                yield self._unscored(self._batch(np.arange(1), 0))


class WindowLoader(GlobalOrder):
    def __init__(self, shards: ShardSet, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, training: bool = True, window: int | None = None):
        self.shards = shards
        self.seq_len = seq_len
        self.window_len = window if window is not None else seq_len + 1
        self.num_windows = max(len(shards) - (self.window_len - seq_len), 0) // seq_len
        self._start(batch_size, seed, shuffle, rank, world_size)
        needed = 1 if not training else self.global_batch
        if self.num_windows < needed:
            raise SlmforgeError(
                f"{shards.folder}: split {shards.split!r} has {len(shards)} tokens, fewer than {needed} "
                f"window(s) of {self.window_len}; lower train.batch_size or "
                f"train.seq_len, or add text")

    def load_state_dict(self, state: dict[str, Any], allow_changes: bool = False) -> None:
        """Continue where the state left off. With `allow_changes` (train.allow_config_changes), data
        cut into another number of windows restarts the saved epoch instead of being refused."""
        consumed = state.get("consumed")
        if consumed is None:  # checkpoints before the global position: batches of one world size
            consumed = state["batch_index"] * self.batch_size * state.get("world_size", 1)
        self._restore(state, consumed, allow_changes,
                      f"data loader state is for {state['num_windows']} windows, this run has {self.num_windows}; "
                      f"the data or seq_len changed since the checkpoint")

    def window(self, index: int) -> np.ndarray:
        return self.shards.read(index * self.seq_len, self.window_len)

    def _batch(self, indices: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """{"tokens": (B, window), "sample_ids": (B,)}"""
        rows = np.stack([self.window(int(i)) for i in indices])
        sample_ids = torch.from_numpy(epoch * self.num_windows + indices.astype(np.int64))
        return {"tokens": torch.from_numpy(rows), "sample_ids": sample_ids}

    def _unscored(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "scored": torch.zeros_like(batch["tokens"], dtype=torch.bool)}
