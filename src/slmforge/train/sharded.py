"""Sharded checkpoints for FSDP2 runs: every rank writes its own shard of the weights and the AdamW
state with torch.distributed.checkpoint (DCP), nothing is gathered on rank 0, and a run resumes on any
number of processes (DCP reshards on load); one process reads the folder whole for eval and export.

    run/checkpoints/step-000500/
        sharded/.metadata, sharded/__0_0.distcp, ...   # {"model": ..., "optimizer": ...}, one file per rank
        meta.json, state.pt                            # as in every step folder (state.pt without optimizer)
        checksums.json                                 # every file above, sub-folder included; written last

The folder is written as `step-N.partial` and renamed like any step folder (checkpoint/writing.py), so a
crash mid-write leaves the previous checkpoint as the newest. With `parallel.async_checkpoint` the
tensors are copied to CPU memory at the step boundary and written by a background thread while
training goes on; a thread of rank 0 then seals the folder (checksums of every shard) and moves
`latest`, also while training goes on. The next save, the end of the run and a stop on a signal wait
for both. The checkpoints folder must be one shared filesystem for all nodes, as for any DCP
checkpoint.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from slmforge.checkpoint import safe_dcp
from slmforge.errors import SlmforgeError
from slmforge.checkpoint.reading import (
    SHARDED,
    check_names_and_shapes,
    dcp_failure,
    dcp_single_process_quiet,
    missing_shards,
    sharded_read_error,
    sharded_tensors,
)
from slmforge.checkpoint.writing import commit_step_folder, seal_folder, step_dir_name, step_meta, \
    write_error, write_small_files
from slmforge.train.parallel import Distributed, any_rank, barrier


# What DCP raises: CheckpointException (every rank's failure, wrapped) is a BaseException, not an Exception.
DCP_ERRORS = (Exception, CheckpointException)


@dataclass
class _Pending:
    """A background write: its future on this rank, where it goes, and (rank 0) the thread that seals
    and commits it once written, and how that went."""

    future: Any
    tmp: Path
    final: Path
    keep_last: int | None
    protect: set[str]
    needed: int
    sealer: threading.Thread | None = None
    error: SlmforgeError | None = None


class ShardedCheckpoints:
    """Writes a run's sharded step folders; all ranks call `save` and `wait` together."""

    def __init__(self, run_dir: Path, where: Distributed, device: torch.device, background: bool,
                 timeout_minutes: float = 60.0):
        self.root = Path(run_dir) / "checkpoints"
        self.where, self.device = where, device
        self.background = background
        self._pending: _Pending | None = None
        # Background writes run their collectives in another thread: on a group of their own, and a
        # gloo one, so they never interleave with training's NCCL collectives. Its time-out bounds how
        # long a write can wait for a rank that failed (see `save`).
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
                       if background and dist.is_initialized() else None)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
             extra_meta: dict[str, Any], keep_last: int | None, protect: set[str]) -> Path:
        """Write step-N (every rank its shard). Returns the folder it will have once committed."""
        self.wait()  # one write at a time: the previous one is sealed before the next starts
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".partial")
        content = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        needed = 3 * sum(_local_bytes(t) for t in content["model"].values()) * self.where.world_size
        error = None
        if self.where.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                write_small_files(tmp, step_meta(step, model, extra_meta), state)
            except Exception as e:
                error = write_error(self.root, final.name, e, needed)
        self._agree(error, final.name)
        barrier()
        # Only a single process needs no_dist (and passing it at all needs torch >= 2.9).
        alone = {} if self.where.active else {"no_dist": True}
        try:
            with dcp_single_process_quiet():
                if self.background:
                    future = dcp.async_save(content, checkpoint_id=str(tmp / SHARDED), process_group=self._group,
                                            **alone)
                else:
                    dcp.save(content, checkpoint_id=str(tmp / SHARDED), **alone)
        except DCP_ERRORS as e:
            error = write_error(self.root, final.name, dcp_failure(e), needed)
        # Agreed in both modes: a rank whose background write failed to start must not leave the others
        # running on into mismatched collectives (their writes then wait for it, bounded by the group's
        # time-out, and the job stops with this rank's error).
        self._agree(error, final.name, tmp)
        if self.background:
            pending = _Pending(future, tmp, final, keep_last, set(protect), needed)
            if self.where.is_main:  # hashing and fsyncing the shards is background work too
                pending.sealer = threading.Thread(target=self._seal_when_written, args=(pending,),
                                                  name="slmforge-seal-checkpoint")
                pending.sealer.start()
            self._pending = pending
            return final
        self._agree(self._commit(tmp, final, keep_last, set(protect), needed), final.name)
        return final

    def _seal_when_written(self, pending: _Pending) -> None:
        """Rank 0's sealer thread: once every rank's shard is written (rank 0's future completes only
        after DCP gathered every rank's result), seal and commit; errors wait in `pending` for `wait`,
        where all ranks agree on them."""
        try:
            pending.future.result()
        except DCP_ERRORS:
            return  # the write failed: `wait` reports it on every rank
        pending.error = self._commit(pending.tmp, pending.final, pending.keep_last, pending.protect, pending.needed)

    def wait(self) -> Path | None:
        """Finish the background write, if any (all ranks together). Returns the committed folder."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = None
        try:
            pending.future.result()
        except DCP_ERRORS as e:
            error = write_error(self.root, pending.final.name, dcp_failure(e), pending.needed)
        if pending.sealer is not None:
            pending.sealer.join()
        self._agree(error, pending.final.name, pending.tmp)
        self._agree(pending.error, pending.final.name)
        return pending.final

    def abandon(self) -> None:
        """The run is failing: a background write that has finished is still sealed and kept (rank 0,
        no collective); one still running is left as `.partial`, which the next start removes."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.sealer is not None and pending.future.done():
            pending.sealer.join()  # the shards are written: sealing them takes moments

    def _commit(self, tmp: Path, final: Path, keep_last: int | None, protect: set[str],
                needed: int) -> SlmforgeError | None:
        """Rank 0: check that every rank's shard is there, seal, rename, point `latest`. Returns the
        error instead of raising it, for all ranks to agree on."""
        if not self.where.is_main:
            return None
        try:
            missing = missing_shards(tmp / SHARDED)
            if missing:
                shutil.rmtree(tmp, ignore_errors=True)
                return SlmforgeError(f"{self.root}: {final.name}: shard {missing[0]} written by another rank is not "
                                     f"visible here; the checkpoints folder must be one shared filesystem for "
                                     f"every node")
            seal_folder(tmp)
            commit_step_folder(self.root, tmp, final, keep_last, protect)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            return write_error(self.root, final.name, e, needed)
        return None

    def _agree(self, error: SlmforgeError | None, name: str, tmp: Path | None = None) -> None:
        """Raise on every rank when any failed, removing the half-written folder (rank 0)."""
        if any_rank(error is not None, self.device):
            if self.where.is_main and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error or SlmforgeError(f"{self.root}: another rank could not write {name} (see its error); "
                                         f"the previous checkpoint is intact")


def load_sharded(step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill `model` (sharded by FSDP2 or whole) and `optimizer` from a sharded step folder written by
    any number of ranks. Under a process group every rank takes part; alone, this process reads all."""
    folder = step_dir / SHARDED
    content = {"model": get_model_state_dict(model)}
    check_names_and_shapes(folder, {name: size for name, (size, _) in sharded_tensors(folder, "model").items()},
                           {name: tensor.shape for name, tensor in content["model"].items()})
    if optimizer is not None:
        content["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with dcp_single_process_quiet():
            safe_dcp.load(content, folder, no_dist=not dist.is_initialized())
    except DCP_ERRORS as e:
        raise sharded_read_error(folder, e) from None
    bad = first_non_finite(content["model"])  # damage that passed the checksums (or was written so)
    if any_rank(bad is not None, next(iter(content["model"].values())).device):
        raise SlmforgeError(f"{folder}: tensor {bad or '(on another rank)'} holds nan or inf; the checkpoint is "
                            f"damaged")
    set_model_state_dict(model, content["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, content["optimizer"])


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of a tensor whose local shard holds nan or inf, or None (no gathering)."""
    for name, tensor in tensors.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()
