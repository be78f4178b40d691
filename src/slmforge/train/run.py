"""The one set-up around the Trainer that every training verb calls (pretrain; distill through
pretrain; finetune, its chat/translation and classify/tag tasks alike). A verb assembles what is its
own — the model's config and weights, the tokenizer, the objective, the loaders, which parameters
train, what its checkpoints tell readers — and this does every other step once, in this order:

    TrainingRun.start   precision, dropout seed (per rank)
    .init_from          train.init_from's checkpoint checked, its architecture taken
    .build              the model: seeded, or left to a checkpoint's weights
    .fit(RunParts)      attention kernel, step counts, resume identity and its check, config.toml and
                        its history, metrics and trackers, the Trainer (meta.json's contents), resume
                        with the optimizer settings applied, fit, close
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slmforge import config as config_io
from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.checkpoint.reading import require_intact, resolve_checkpoint
from slmforge.formatting import say
from slmforge.objectives.base import Objective
from slmforge.runtime import apply_attention, describe, resolve_precision
from slmforge.train.parallel import build_for_strategy, strategy_for
from slmforge.train.resume_check import append_history, apply_optimizer_settings, check_resumable, resume_identity
from slmforge.train.session import Session, open_metrics
from slmforge.train.trainer import Trainer

# The most of a run that a warmup given in steps may take (schedule.warmup_ratio is kept as chosen). A
# recipe's warmup is sized for its full length: run for 200 steps, seed 000's 2,000-step warmup reached
# 3e-5 of its 3e-4 and the loss barely moved (issue 23).
WARMUP_CAP = 0.1


@dataclass
class RunParts:
    """What a training verb brings to the set-up; the rest is the same for every verb."""

    model: nn.Module
    """Built by `TrainingRun.build`, its weights loaded and its trainable parameters chosen (requires_grad)."""
    objective: Objective
    train_loader: Any
    """Deterministic given (seed, rank, world size, position): `batches_per_epoch`, `state_dict()`."""
    val_batches: Callable[[], Iterable[dict]] | None
    fingerprint: str
    """What the training data is (not where): a resume on other data is refused."""
    meta: dict[str, Any]
    """What readers of the checkpoints need (tokenizer hash, seq_len, add_bos, objective, task, teacher);
    the set-up adds the run's facts, the checkpointer the step's."""
    description: str
    """The middle of the `run folder ... | device ...` line: model, parameters, data."""
    identity: dict[str, Any] = field(default_factory=dict)
    """More of what exactness depends on, beyond the config's EXACTNESS_FIELDS (finetune: packing, LoRA)."""
    checkpoint_format: Any = None
    """How weights go into a step folder when not as model.state_dict() (LoRA); None: the plain way."""
    val_bytes_per_token: float | None = None


@dataclass
class TrainingRun:
    """One training run's set-up: `cfg` has the sections every training config has ([train], [optim],
    [schedule], [parallel], [tracking], [model]); `session` the device, ranks, run folder and the
    checkpoint to resume from."""

    cfg: Any
    session: Session
    precision: str

    @classmethod
    def start(cls, cfg, session: Session) -> TrainingRun:
        """The first step of every verb: the precision, and the global RNG seeded before anything draws from it."""
        precision = resolve_precision(cfg.train.precision, session.device)
        # Dropout differs per rank; weights, data and masks do not (they have seeds of their own).
        torch.manual_seed(cfg.train.seed + session.where.rank)
        return cls(cfg, session, precision)

    @property
    def resuming(self) -> bool:
        return self.session.resume_dir is not None

    def init_from(self) -> Path | None:
        """train.init_from's step folder (None without one), checked like a resume; the architecture
        becomes the checkpoint's (e.g. one made by import-hf): [model] is not consulted."""
        if not self.cfg.train.init_from:
            return None
        init_dir = resolve_checkpoint(self.cfg.train.init_from)
        require_intact(init_dir)  # a starting point from elsewhere is checked like a resume
        self.cfg.model = CheckpointMeta.read(init_dir).model_config()
        say(f"model config taken from {init_dir}")
        return init_dir

    def build(self, weights_from: Path | None = None) -> nn.Module:
        """The model on this process's device: initialised from train.seed, or, when resuming or
        starting from `weights_from`, left for the checkpoint to fill (initialising weights about to
        be replaced costs seconds at 270M); `weights_from`'s are loaded here on a fresh start."""
        fresh = weights_from if not self.resuming else None
        seed = None if self.resuming or fresh is not None else self.cfg.train.seed
        # FSDP2 builds on the meta device and initialises each rank's shard when it wraps (parallel.py)
        strategy = strategy_for(self.cfg.parallel, self.session.where)
        model = build_for_strategy(self.cfg.model, self.session.device, strategy, seed, fresh)
        if fresh is not None:
            say(f"initialised weights from {fresh}")
        return model

    def fit(self, parts: RunParts) -> tuple[Trainer, dict[str, float] | None]:
        """Train the parts to train.max_steps (resuming when the session found a checkpoint); returns
        the trainer and the final validation figures."""
        apply_attention(parts.model, self.cfg.train.attention, self.session.device)
        resolve_steps(self.cfg, parts.train_loader.batches_per_epoch)
        return self.fit_resolved(parts)

    def fit_resolved(self, parts: RunParts) -> tuple[Trainer, dict[str, float] | None]:
        """`fit` for a verb that set the attention kernel and resolved the step counts itself."""
        cfg, session, loop, where = self.cfg, self.session, self.cfg.train, self.session.where
        resolved = config_io.to_dict(cfg)
        identity = {**resume_identity(resolved, where.world_size, parts.fingerprint), **parts.identity}
        saved = CheckpointMeta.read(session.resume_dir) if self.resuming else None
        if saved is not None:
            check_resumable(saved.resume_identity, identity, session.resume_dir, loop.allow_config_changes, say)
        if where.is_main:
            config_io.save(cfg, session.run_dir / "config.toml")
            append_history(session.run_dir, resolved, (saved.step or 0) if saved is not None else 0)

        metrics = open_metrics(cfg.tracking, cfg, session)  # rank 0 only: metrics.jsonl, trackers, plots
        try:
            trainer = Trainer(
                model=parts.model, objective=parts.objective, train_loader=parts.train_loader, loop=loop,
                optim=cfg.optim, schedule=cfg.schedule, run_dir=session.run_dir, metrics=metrics,
                device=session.device, precision=self.precision, val_batches=parts.val_batches,
                val_bytes_per_token=parts.val_bytes_per_token,
                checkpoint_meta=self.checkpoint_meta(parts, resolved, identity),
                flops_per_token=cfg.model.flops_per_token(loop.seq_len), seed=loop.seed, where=where,
                parallel=cfg.parallel, checkpoint_format=parts.checkpoint_format)
            say(f"run folder {session.run_dir} | {parts.description} | device {session.device} ({self.precision})"
                + (f" | {where.world_size} processes ({trainer.strategy})" if where.active else ""))
            if self.resuming:
                trainer.resume_from(session.resume_dir)
                apply_optimizer_settings(trainer.optimizer, cfg.optim, say)
            elif metrics is not None:
                metrics.truncate_after(0)  # records of an attempt that crashed before its first checkpoint
            held_out = trainer.fit()
        finally:
            if metrics is not None:
                metrics.close()  # also when resuming fails: trackers are finished, the file closed
        return trainer, held_out

    def checkpoint_meta(self, parts: RunParts, resolved: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
        """What every step folder's meta.json holds besides the step and its progress (added by the
        checkpointer): the verb's facts for readers, then the run's — processes, resolved config,
        what resume exactness depends on, dropout seeds, hardware and versions."""
        where, seed = self.session.where, self.cfg.train.seed
        return {**parts.meta, "processes": where.world_size, "config": resolved,
                "data_fingerprint": parts.fingerprint, "resume_identity": identity,
                "dropout_seeds": [seed + r for r in range(where.world_size)],
                **describe(self.session.device, self.precision, where.world_size)}


def resolve_steps(cfg, batches_per_epoch: int) -> None:
    """Turn train.epochs and schedule.warmup_ratio into step counts (as HF Trainer's num_train_epochs
    and warmup_ratio); the resolved numbers are what config.toml records."""
    loop, schedule = cfg.train, cfg.schedule
    if loop.epochs:
        loop.max_steps = max(1, math.ceil(loop.epochs * batches_per_epoch / loop.grad_accum))
        say(f"train.max_steps set to {loop.max_steps} for {loop.epochs:g} epochs of {batches_per_epoch} batches")
    cap = max(1, int(WARMUP_CAP * loop.max_steps))
    if schedule.warmup_ratio is not None:  # a share the user chose is kept as it is
        schedule.warmup_steps = round(schedule.warmup_ratio * loop.max_steps)
    elif schedule.warmup_steps > cap:
        say(f"note: schedule.warmup_steps {schedule.warmup_steps} capped at {cap}, {WARMUP_CAP:.0%} of the "
            f"run's {loop.max_steps} steps (a short run of a long recipe would spend itself warming up)")
        schedule.warmup_steps = cap
