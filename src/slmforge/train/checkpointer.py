"""A run's checkpoints, for the Trainer: which kind of step folder it writes, how the weights get
there, and how a resume reads them back. The Trainer says when (`save(step, ...)`, `restore(...)`,
`wait()`); everything about files is here.

Three ways weights reach a step folder, chosen once per run:
- one model.safetensors written by rank 0 (one process, DDP; FSDP2 with parallel.checkpoint = "full",
  gathered first), through `checkpoint/writing.py` (`.partial`, checksums last, `latest`, keep_last);
- every rank its shard with torch.distributed.checkpoint (FSDP2), through `train/sharded.py`;
- a checkpoint format of the verb's (LoRA: merged weights plus the adapter files, finetune/lora.py).

meta.json is the run's meta (given once, by the run set-up) plus this step's progress, so every step
folder of a run describes itself the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.checkpoint.reading import is_sharded_checkpoint, load_weights, read_weights, resolve_checkpoint
from slmforge.checkpoint.writing import load_state, save_checkpoint
from slmforge.errors import SlmforgeError
from slmforge.train.parallel import Distributed, ParallelConfig, any_rank
from slmforge.train.sharded import ShardedCheckpoints, first_non_finite, load_sharded

# Whole (unsharded) tensors, on the CPU, on rank 0: what a checkpoint holds under every strategy.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# What the Trainer hands over at a save, once the weights are known to be finite: its state (optimizer
# included, or not for sharded folders, which keep it in the shards) and this step's progress for meta.json.
Snapshot = Callable[[bool], tuple[dict[str, Any], dict[str, Any]]]


@dataclass
class Restored:
    """What a resume read: the step folder, the trainer state, and the config it was written with."""

    folder: Path
    state: dict[str, Any]
    config: dict[str, Any] | None


class Checkpointer:
    """Writes and reads one run's step folders; every rank calls `save`, `restore` and `wait` together."""

    def __init__(self, run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 meta: dict[str, Any], where: Distributed, device: torch.device, strategy: str,
                 model_sharded: bool, parallel: ParallelConfig, keep_last: int = 0, checkpoint_format=None,
                 objective_parameters: bool = False):
        self.run_dir = Path(run_dir)
        self.model, self.optimizer = model, optimizer  # the plain model: what checkpoints hold
        self.meta = meta
        self.where, self.device = where, device
        self.model_sharded = model_sharded  # FSDP2 wrapped it: whole weights are gathered, or written as shards
        self.keep_last = keep_last or None
        # How weights go into and come out of a step folder when not as model.state_dict() (LoRA:
        # merged weights plus the adapter files; see finetune/lora.py). None: the plain way.
        self.format = checkpoint_format
        # Parameters the objective trains beside the model (distillation's projection) ride in the
        # trainer state, which a sharded folder cannot restore alongside its shards.
        self.objective_parameters = objective_parameters
        # FSDP2 runs write sharded step folders (every rank its shard); the rest one model.safetensors.
        self.sharded = (ShardedCheckpoints(self.run_dir, where, device, parallel.async_checkpoint,
                                           parallel.timeout_minutes)
                        if strategy == "fsdp" and parallel.checkpoint != "full" and checkpoint_format is None
                        else None)

    # ------------------------------------------------------------ writing

    def save(self, step: int, snapshot: Snapshot, protect: set[str]) -> Path:
        """Write step-N: every rank takes part (gathering weights and state); rank 0 writes one
        model.safetensors, or every rank its shard. Never a checkpoint with non-finite weights.
        `protect` names step folders keep_last must not prune (the best by validation loss)."""
        if self.sharded is not None:
            return self._save_sharded(step, snapshot, protect)
        weights = self._full_weights()
        self._refuse_non_finite(step, first_non_finite(weights))  # rank 0 alone holds the gathered weights
        state, progress = snapshot(True)
        folder, error = self.run_dir / "checkpoints", None
        if self.where.is_main:
            extra = self.format.extra_files(self.model) if self.format else None
            try:
                folder = save_checkpoint(self.run_dir, step, self.model, state=state, tensors=weights,
                                         extra_meta={**self.meta, **progress}, keep_last=self.keep_last,
                                         protect=protect, extra_files=extra)
            except SlmforgeError as e:
                error = e
        if any_rank(error is not None, self.device):
            raise error or SlmforgeError(f"rank 0 could not write the step-{step} checkpoint (see its error)")
        return folder

    def _save_sharded(self, step: int, snapshot: Snapshot, protect: set[str]) -> Path:
        """Every rank writes its shard (in the background with parallel.async_checkpoint)."""
        self.sharded.wait()  # the previous write is sealed first, so a refusal below names the true newest
        self._refuse_non_finite(step, first_non_finite(self.model.state_dict()))  # each rank checks its shards
        state, progress = snapshot(False)
        return self.sharded.save(step, self.model, self.optimizer, state, {**self.meta, **progress},
                                 self.keep_last, protect)

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors on rank 0 (gathered from the shards under FSDP2; a collective)."""
        if self.model_sharded:
            return get_model_state_dict(self.model, options=FULL_STATE)
        if not self.where.is_main:
            return {}
        return self.format.tensors(self.model) if self.format else self.model.state_dict()

    def _refuse_non_finite(self, step: int, bad: str | None) -> None:
        """Never write a checkpoint that would poison every resume. Decided together: a rank that raised
        alone would leave the others waiting in the next collective."""
        if any_rank(bad is not None, self.device):
            raise SlmforgeError(f"step {step}: weights are not finite ({bad or 'on another rank'}); nothing saved, "
                                f"the newest checkpoint in {self.run_dir / 'checkpoints'} is the last good one")

    def wait(self) -> None:
        """Finish a background (sharded) write and seal it (all ranks)."""
        if self.sharded is not None:
            self.sharded.wait()

    def abandon(self) -> None:
        """The run is failing: a background write that already finished is still kept (no collective)."""
        if self.sharded is not None:
            self.sharded.abandon()

    # ------------------------------------------------------------ reading

    def restore(self, checkpoint: str | Path) -> Restored:
        """Fill the model (and, from a sharded folder, the optimizer) from a step folder; return the
        trainer state and config it holds. Any strategy and number of processes: DCP reshards, and a
        whole model.safetensors is read by every rank, which keeps its shard under FSDP2."""
        step_dir = resolve_checkpoint(checkpoint)
        if is_sharded_checkpoint(step_dir):
            if self.format is not None or self.objective_parameters:
                raise SlmforgeError(f"{step_dir}: a sharded (FSDP2) checkpoint resumes plain training only, not "
                                    f"LoRA or an objective with parameters of its own")
            load_sharded(step_dir, self.model, self.optimizer)
        elif self.format is not None:
            self.format.load(self.model, step_dir)
        elif self.model_sharded:
            set_model_state_dict(self.model, read_weights(self.model, step_dir),
                                 options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            load_weights(self.model, step_dir)
        return Restored(step_dir, load_state(step_dir), CheckpointMeta.read(step_dir).config)
