"""What every training verb (pretrain, finetune; distill runs through pretrain) does around its Trainer: one device
per process, the process group, one writer per run folder, leftovers of a crash cleared, and the
checkpoint to resume from chosen; then the run's metrics log and trackers on rank 0."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from slmforge import config as config_io
from slmforge.checkpoint.reading import newest_good_checkpoint, step_folders
from slmforge.checkpoint.writing import clean_stale
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.runtime import cpu_threads_for_training, resolve_device
from slmforge.train.config import TrackingConfig, TrainLoopConfig
from slmforge.train.lock import NewRunFolder, RunLock
from slmforge.train.metrics import MetricsLog, make_trackers
from slmforge.train.parallel import Distributed, ParallelConfig, barrier, broadcast_objects, environment, \
    init_distributed, local_device, shutdown


@dataclass
class Session:
    run_dir: Path
    resume_dir: Path | None
    """The intact step folder to resume from; None: a fresh start."""
    device: torch.device
    where: Distributed


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file() or bool(step_folders(run_dir))


def resume_point(run_dir: Path, mode: str) -> Path | None:
    """The intact step folder to resume from (None: start fresh), per train.resume. A damaged newest
    checkpoint falls back to the newest intact one, saying so; a missing `latest` does not hide the
    step folders (starting over would wipe metrics.jsonl and overwrite them)."""
    if not has_checkpoint(run_dir):
        if mode == "required":
            raise SlmforgeError(f"train.resume: 'required' but {run_dir} has no checkpoint")
        return None
    if mode == "never":
        raise SlmforgeError(f"train.out_dir: {run_dir} already holds checkpoints; choose another folder "
                            f"or resume with train.resume=auto")
    found = newest_good_checkpoint(run_dir, say)
    if found is None:
        raise SlmforgeError(f"{run_dir / 'checkpoints'}: no intact checkpoint to resume from (see the warnings "
                            f"above); start over in another train.out_dir")
    return found


def agreed_resume_point(run_dir: Path, mode: str, where: Distributed) -> Path | None:
    """`resume_point`, decided by rank 0 alone (it reads and hashes the checkpoints once, not once per
    process) and given to every rank, its refusal included, so all ranks go on or stop together."""
    if not where.active:
        return resume_point(run_dir, mode)
    decision: list = [None]
    if where.is_main:
        try:
            decision = [("ok", resume_point(run_dir, mode))]
        except SlmforgeError as e:
            decision = [("error", str(e))]
    broadcast_objects(decision)
    outcome, value = decision[0]
    if outcome == "error":
        raise SlmforgeError(value)
    return value


@contextmanager
def training_session(loop: TrainLoopConfig, parallel: ParallelConfig) -> Iterator[Session]:
    run_dir = Path(loop.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SlmforgeError(f"train.out_dir: {run_dir} exists and is not a folder")
    device = local_device(resolve_device(loop.device), environment())
    where = init_distributed(parallel, device)
    if device.type == "cpu":
        cpu_threads_for_training(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    made = NewRunFolder(run_dir) if where.is_main else None  # recorded before the lock creates the folder
    lock = RunLock(run_dir).acquire() if where.is_main else None  # one writer per run folder
    try:
        if where.is_main:
            for name in clean_stale(run_dir):
                say(f"removed {name}, left half-written by an earlier crash")
        barrier()
        yield Session(run_dir, agreed_resume_point(run_dir, loop.resume, where), device, where)
    except BaseException:
        if made is not None:  # failed before its first checkpoint: take away what it created
            made.remove_if_unused()
        raise
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def open_metrics(tracking: TrackingConfig, cfg, session: Session) -> MetricsLog | None:
    """metrics.jsonl and the configured trackers, on rank 0 only (None elsewhere)."""
    if not session.where.is_main:
        return None
    trackers = make_trackers(tracking.backends, tracking.project, tracking.run_name or session.run_dir.name,
                             config_io.to_dict(cfg), session.run_dir)
    return MetricsLog(session.run_dir / "metrics.jsonl", trackers)
