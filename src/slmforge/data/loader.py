"""Deterministic, resumable batches of token windows from prepared shards.

The token stream is cut into windows starting every seq_len tokens, `window` tokens long: seq_len + 1
for causal LM (inputs and shifted targets overlap by one), seq_len for masked LM. The objective
decides (`window_tokens`) and turns the raw windows into inputs and targets. Each epoch visits every
window once in an order fixed by (seed, epoch); rank r of w takes every w-th window of that order.
The loader's whole state is (epoch, batch index), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slmforge.data.shards import ShardSet
from slmforge.errors import SlmforgeError


class WindowLoader:
    def __init__(self, shards: ShardSet, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, training: bool = True, window: int | None = None):
        self.shards = shards
        self.seq_len = seq_len
        self.window_len = window if window is not None else seq_len + 1
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.num_windows = max(len(shards) - (self.window_len - seq_len), 0) // seq_len
        self.batches_per_epoch = self.num_windows // (batch_size * world_size)
        needed = 1 if not training else batch_size * world_size
        if self.num_windows < needed:
            raise SlmforgeError(
                f"{shards.folder}: split {shards.split!r} has {len(shards)} tokens, fewer than {needed} "
                f"window(s) of {self.window_len}; lower train.batch_size or "
                f"train.seq_len, or add text")
        self.epoch = 0
        self.batch_index = 0
        self._order: np.ndarray | None = None

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "num_windows": self.num_windows, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_windows"] != self.num_windows or state["world_size"] != self.world_size:
            raise SlmforgeError(
                f"data loader state is for {state['num_windows']} windows on {state['world_size']} ranks, "
                f"this run has {self.num_windows} on {self.world_size}; the data or seq_len changed since "
                f"the checkpoint")
        self.epoch, self.batch_index, self.seed = state["epoch"], state["batch_index"], state["seed"]
        self._order = None

    # ------------------------------------------------------------ iteration

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = order[self.rank::self.world_size]
        return self._order

    def window(self, index: int) -> np.ndarray:
        return self.shards.read(index * self.seq_len, self.window_len)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next raw batch {"tokens": (B, window)}, wrapping into a new epoch when one ends."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
            self._order = None
        order = self._epoch_order()
        start = self.batch_index * self.batch_size
        rows = np.stack([self.window(int(i)) for i in order[start:start + self.batch_size]])
        self.batch_index += 1
        return {"tokens": torch.from_numpy(rows)}

    def epoch_batches(self, limit: int | None = None):
        """Batches of one pass in fixed order (for evaluation); does not touch the training state."""
        order = np.arange(self.num_windows)[self.rank::self.world_size]
        count = -(-len(order) // self.batch_size)  # the last batch may be short
        if limit is not None:
            count = min(count, limit)
        for b in range(count):
            rows = np.stack([self.window(int(i)) for i in order[b * self.batch_size:(b + 1) * self.batch_size]])
            yield {"tokens": torch.from_numpy(rows)}
