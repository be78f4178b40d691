"""The one training loop. Pretraining, distillation and fine-tuning differ only by the objective
(raw batch -> inputs, targets, loss) and by which parameters have requires_grad; everything else, one
process or many, lives here once."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from slmforge.errors import SlmforgeError
from slmforge.formatting import duration, human, say
from slmforge.runtime import peak_flops
from slmforge.objectives.base import input_tokens, mean_loss, summarize, target_tokens
from slmforge.objectives.losses import HeadLoss
from slmforge.train.checkpointer import FULL_STATE, Checkpointer
from slmforge.train.config import OptimConfig, ScheduleConfig, TrainLoopConfig
from slmforge.train.metrics import MetricsLog, plot_losses, record_event
from slmforge.train.optim import build_optimizer, check_optimizer_kind, learning_rate
from slmforge.train.resume_check import announce_schedule_changes, schedule_settings
from slmforge.train.parallel import (
    Distributed,
    ObjectiveModule,
    ParallelConfig,
    all_reduce_sum,
    any_rank,
    any_rank_each,
    gather_objects,
    is_sharded,
    no_gradient_sync,
    objective_parameters,
    strategy_for,
    wrap,
)
from slmforge.train.signals import SIGNAL_EXIT_CODES, RunSignals, StopRequested, training_signals


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    # running sums since the last log line, kept in the checkpoint so a resumed run logs the same
    loss_sum: float = 0.0
    loss_steps: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    # steps whose loss or gradient was not finite: the update was skipped
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    # the checkpoint with the lowest validation loss is never pruned
    best_val_loss: float | None = None
    best_step: int | None = None
    # seconds spent training, summed over every attempt of the run (not the gaps between them)
    train_seconds: float = 0.0


class Trainer:
    _signals: RunSignals | None = None  # the run's signal handlers while fit() runs

    def __init__(self, *, model: nn.Module, objective, train_loader, loop: TrainLoopConfig, optim: OptimConfig,
                 schedule: ScheduleConfig, run_dir: str | Path, metrics: MetricsLog | None, device: torch.device,
                 precision: str = "fp32", val_batches: Callable[[], Iterable[dict]] | None = None,
                 val_bytes_per_token: float | None = None, checkpoint_meta: dict[str, Any] | None = None,
                 flops_per_token: float | None = None, seed: int = 0, where: Distributed = Distributed(),
                 parallel: ParallelConfig | None = None, log=None, checkpoint_format=None):
        self.model = model  # the plain model: what checkpoints hold
        self.objective = objective
        head_loss = HeadLoss(loop.loss_kernel, loop.loss_chunk_rows)  # a training choice, not the objective's
        head_loss.check(device)
        objective.use_head_loss(head_loss)
        self.where = where
        parallel = parallel or ParallelConfig()
        self.strategy = strategy_for(parallel, where)
        # DDP wraps model + objective together, so the loss and the output head run inside its forward.
        self.module = wrap(ObjectiveModule(model, objective), self.strategy, device, parallel, precision,
                           compile=loop.compile)
        self.loader = train_loader
        self.loop, self.optim_cfg, self.schedule = loop, optim, schedule
        self.run_dir = Path(run_dir)
        self.metrics = metrics if where.is_main else None  # only rank 0 writes logs
        self.device = device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        self.val_batches = val_batches
        self.val_bytes_per_token = val_bytes_per_token
        self.flops_per_token = flops_per_token
        # Peak of all processes together, for MFU (None where the device's peak is not known).
        peak = peak_flops(device)
        self.peak_flops = peak * where.world_size if peak else None
        self.seed = seed
        # What owns the optimizer's parameters: the model, plus parameters the objective trains beside
        # it (distillation's hidden-state projection), which are saved in the trainer state.
        self.objective_parameters = objective_parameters(objective)
        if self.objective_parameters is not None and is_sharded(self.module):
            raise SlmforgeError("parallel.strategy: an objective with parameters of its own (distill.hidden_weight) "
                                "trains under DDP or on one process, not FSDP2")
        self.owner = model if self.objective_parameters is None else _ModelAndObjective(model, self.objective_parameters)
        self.optimizer = build_optimizer(self.owner, optim, device.type)
        # checkpoint_meta: what every step folder's meta.json holds besides the step's progress (train/run.py).
        self.checkpointer = Checkpointer(
            self.run_dir, model, self.optimizer, meta=checkpoint_meta or {},
            where=where, device=device, strategy=self.strategy, model_sharded=is_sharded(self.module),
            parallel=parallel, keep_last=loop.keep_last, checkpoint_format=checkpoint_format,
            objective_parameters=self.objective_parameters is not None)
        if where.is_main:
            for note in self._ignored_parallel_settings(parallel):
                say(f"note: {note}")
        self.state = TrainState()
        self._pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        printer = log or say  # say: stderr, silent in quiet mode except warnings
        self.log = printer if where.is_main else (lambda msg: None)

    def _ignored_parallel_settings(self, parallel: ParallelConfig) -> list[str]:
        """[parallel] settings this run cannot apply, said once rather than silently dropped."""
        notes = []
        if parallel.strategy in ("ddp", "fsdp") and not self.where.active:
            notes.append(f"parallel.strategy = \"{parallel.strategy}\" on one process: nothing to spread; "
                         f"launch with torchrun to use several")
        if self.checkpointer.sharded is None and (parallel.checkpoint == "sharded" or parallel.async_checkpoint):
            what = "parallel.checkpoint = \"sharded\"" if parallel.checkpoint == "sharded" else \
                "parallel.async_checkpoint"
            notes.append(f"{what} applies to FSDP2 runs; this run writes one model.safetensors at each save")
        return notes

    # ------------------------------------------------------------ checkpoint state

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """Trainer, optimizer, loader and every rank's RNG (a collective: all ranks call it).

        The optimizer state is the full one keyed by parameter names, whatever the strategy, so a
        checkpoint resumes on one process, under DDP or under FSDP2, with any number of processes
        (sharded checkpoints keep it in their shards instead: optimizer=False)."""
        self._collect_losses()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"trainer": vars(self.state).copy(), "loader": self.loader.state_dict(), "rng": gather_objects(rng)}
        if optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.owner, self.optimizer, options=FULL_STATE)
        if self.objective_parameters is not None:
            state["objective_parameters"] = {k: v.detach().cpu() for k, v in self.objective_parameters.state_dict().items()}
        carried = self.objective.state_dict()  # e.g. distillation's alone twin (a collective there too)
        if carried:
            state["objective"] = carried
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TrainState(**{"metric_sums": {}, **state["trainer"]})
        if self.objective_parameters is not None:
            if "objective_parameters" not in state:
                raise SlmforgeError("the checkpoint has no state for the objective's own parameters (it was written "
                                    "without distill.hidden_weight); resume with the settings it was written with")
            self.objective_parameters.load_state_dict(state["objective_parameters"])
        self.objective.load_state_dict(state.get("objective"))
        saved = state.get("optimizer")  # absent from sharded checkpoints: loaded with the weights
        check_optimizer_kind(saved, self.optim_cfg.kind)  # AdamW's state into Muon's (or back): one line
        if saved is not None and all(isinstance(key, int) for key in saved.get("state", {})):  # before names
            self.optimizer.load_state_dict(saved)
        elif saved is not None:
            set_optimizer_state_dict(self.owner, self.optimizer, saved,
                                     options=StateDictOptions(full_state_dict=True))
        if state["loader"]["num_windows"] != self.loader.num_windows and self.loop.allow_config_changes:
            self.warn(f"the data now has {self.loader.num_windows} windows, the checkpoint's had "
                      f"{state['loader']['num_windows']}: epoch {state['loader']['epoch']} starts over")
        self.loader.load_state_dict(state["loader"], allow_changes=self.loop.allow_config_changes)
        saved = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(saved) != self.where.world_size:
            # Another number of processes: data order and masks continue exactly (they are global);
            # only dropout noise restarts, from seed + rank + step.
            self.warn(f"resuming {len(saved)}-process state on {self.where.world_size} processes: dropout is "
                      f"reseeded; data order and masks continue exactly")
            torch.manual_seed(self.seed + self.where.rank + 1_000_003 * self.state.step)
            return
        rng = saved[self.where.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def resume_from(self, checkpoint: str | Path) -> None:
        restored = self.checkpointer.restore(checkpoint)
        self.load_state_dict(restored.state)
        if self.metrics is not None:
            self.metrics.truncate_after(self.state.step)
        self.log(f"resumed from {restored.folder} at step {self.state.step}")
        # The learning rate is recomputed every step and clipping read from the config: a change to
        # either takes effect silently unless said here.
        announce_schedule_changes(restored.config, schedule_settings(self.optim_cfg, self.schedule, self.loop),
                                  self.log)

    def save(self) -> Path:
        """Every rank takes part (state gathering); rank 0 writes; all wait until it is on disk. A
        second stop signal during the write lets it finish."""
        with self._signals.saving() if self._signals is not None else nullcontext():
            folder = self.checkpointer.save(self.state.step, self._snapshot, self._protected())
        self._last_save = time.monotonic()
        return folder

    def _snapshot(self, optimizer: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a checkpoint of this step holds besides the weights: the trainer state (a collective)
        and the progress meta.json records, with the training time counted up to now."""
        self._count_time()
        state = self.state_dict(optimizer)
        return state, {"tokens_seen": self.state.tokens, "wall_time_s": round(self.state.train_seconds, 3)}

    def _protected(self) -> set[str]:
        """Step folders pruning must keep: the best by validation loss."""
        return {f"step-{self.state.best_step:06d}"} if self.state.best_step is not None else set()

    def finish_saving(self) -> None:
        """Wait for a background checkpoint write and seal it (all ranks)."""
        with self._signals.saving() if self._signals is not None else nullcontext():
            self.checkpointer.wait()

    # ------------------------------------------------------------ the loop

    def _micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], list[int], int]:
        """This rank's grad_accum micro-batches, made by the objective from raw windows, their target
        counts and their real (not padding) input tokens (counted on the host, before the copy: no
        device sync)."""
        batches, counts, tokens = [], [], 0
        # During a batch warmup (train.batch_warmup_steps) the loader hands out only the rows trained on
        # and moves on by them, rather than a full batch cut down (which would throw windows away): the
        # position stays a function of the step, as the ramp is, every rank takes the same rows (2
        # processes still read what 1 with twice the batch reads), and tokens count what was trained on.
        rows = self.loop.micro_batch_at(self.state.step)
        for _ in range(self.loop.grad_accum):
            batch = self.objective.collate(self.loader.next_batch(rows), self.seed)
            counts.append(target_tokens(batch))
            tokens += input_tokens(batch)
            if self.device.type == "cuda":  # page-locked: the copy runs while the GPU works on the step before
                batch = {k: v.pin_memory() for k, v in batch.items()}
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return batches, counts, tokens

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over grad_accum micro-batches on every rank; returns the loss and metrics
        averaged over every target of the step (all ranks, all micro-batches)."""
        lr = learning_rate(self.state.step, self.loop.max_steps, self.optim_cfg, self.schedule)
        self.objective.set_progress(self.state.step, self.loop.max_steps)  # distillation's alpha and T
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches, counts, tokens = self._micro_batches()
        # The loss is a mean over the targets of the whole step, whatever the split into ranks and
        # micro-batches: masked LM batches hold different numbers of targets, and a mean of means
        # would weight them wrongly (and make 2 processes differ from 1).
        # One all-reduce gives the step's targets and input tokens over all ranks (packed or padded
        # rows hold different numbers of real tokens on each).
        exact = torch.float64 if self.device.type != "mps" else torch.float32  # MPS has no float64
        step_counts = all_reduce_sum(torch.tensor([float(sum(counts)), float(tokens)], dtype=exact,
                                                  device=self.device))
        total = step_counts[:1]
        scale = self.where.world_size / total.clamp(min=1)  # DDP averages gradients over ranks
        # Sums stay on the device until a log line needs them: reading them every step would make
        # the host wait for the GPU instead of preparing the next batch.
        sums: dict[str, torch.Tensor] = {}
        for i, (batch, count) in enumerate(zip(batches, counts)):
            with no_gradient_sync(self.module, skip=i < len(batches) - 1):
                with self.autocast:
                    loss, metrics = self.module(batch)
                (loss * count * scale).backward()
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * count
        names = list(sums)
        reduced = all_reduce_sum(torch.stack([sums[name] for name in names])) / total.clamp(min=1)
        # The norm is logged even without clipping (max_norm=inf measures without scaling).
        max_norm = self.loop.clip_grad if self.loop.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm)
        self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self._lr = lr
        # One host sync per step: a non-finite loss or gradient must not reach the weights. Every rank
        # sees the same all-reduced values, so all of them skip together.
        finite = bool(torch.isfinite(reduced[0]) & torch.isfinite(self._grad_norm))
        self.state.tokens += int(step_counts[1])  # already on the host side of that sync's wait
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self._skip_step(float(reduced[0]))
            return None
        try:
            self.optimizer.step()
        except RuntimeError as e:
            # AdamW turns lr / (1 - beta1^step) and lr x weight_decay into float32 scalars; a huge lr
            # (the config allows up to float32's range) overflows there instead of giving inf weights.
            if "without overflow" not in str(e):
                raise
            raise SlmforgeError(f"optim.lr: the update of step {self.state.step + 1} overflows float32 (lr {lr:.4g}, "
                                f"weight_decay {self.optim_cfg.weight_decay:g}); use a smaller optim.lr") from None
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.bad_in_a_row = 0
        values = dict(zip(names, reduced))
        return values.pop("loss"), values

    def _skip_step(self, loss: float) -> None:
        """Count a skipped update, say so, and stop when too many come in a row."""
        self.state.skipped_steps += 1
        self.state.bad_in_a_row += 1
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        if self.metrics is not None:
            self.metrics.write({"step": self.state.step, "split": "train", "skipped": f"non-finite {what}",
                                "loss": loss, "lr": self._lr, "skipped_steps": self.state.skipped_steps})
        self.log(f"step {self.state.step:>6}: non-finite {what}; update skipped "
                 f"({self.state.skipped_steps} so far, {self.state.bad_in_a_row} in a row)")
        if self.state.bad_in_a_row >= self.loop.max_bad_steps:
            raise SlmforgeError(f"step {self.state.step}: {self.state.bad_in_a_row} steps in a row had a non-finite "
                                f"{what} (optim.lr too high? bf16 overflow?); stopped, the checkpoints are intact")

    def _collect_losses(self) -> None:
        """Move per-step losses from the device into the running sums, in step order (so a resumed
        run adds the same floats in the same order as an uninterrupted one)."""
        for loss, metrics in self._pending:
            self.state.loss_sum += float(loss)
            self.state.loss_steps += 1
            for name, value in metrics.items():
                self.state.metric_sums[name] = self.state.metric_sums.get(name, 0.0) + float(value)
        self._pending = []

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.owner.parameters() if p.requires_grad]

    def evaluate(self) -> dict[str, float] | None:
        """Validation over this rank's share of the fixed batches, combined over ranks."""
        if self.val_batches is None:
            return None
        means, tokens = mean_loss(self.model, self.objective, self.val_batches(), self.device, self.autocast,
                                  loss_fn=self.module)
        names = list(means)
        local = [means[n] * tokens if tokens else 0.0 for n in names] + [float(tokens)]
        # float64 sums on the CPU (MPS has no float64); only a process group needs them on the device
        sums = torch.tensor(local, dtype=torch.float64)
        combined = all_reduce_sum(sums.to(self.device) if self.where.active else sums).tolist()
        tokens = int(combined[-1])
        means = {n: (v / tokens if tokens else float("nan")) for n, v in zip(names, combined)}
        result = summarize(means, self.val_bytes_per_token if self.objective.bits_per_byte else None)
        if math.isfinite(result["loss"]) and (self.state.best_val_loss is None or result["loss"] < self.state.best_val_loss):
            self.state.best_val_loss, self.state.best_step = result["loss"], self.state.step
        if self.metrics is not None:
            self.metrics.write({"step": self.state.step, "split": "val", **result, "tokens": tokens})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in result.items())
        self.log(f"step {self.state.step:>6} | validation | {shown}")
        return result

    def _log_train(self, step: int) -> None:
        """One metrics.jsonl record and one progress line for the steps since the last one."""
        self._collect_losses()
        now = time.perf_counter()
        window_start, window_tokens = self._window
        run_start, start_step = self._run_start
        tok_s = (self.state.tokens - window_tokens) / max(now - window_start, 1e-9)
        eta = (now - run_start) / max(step - start_step, 1) * (self.loop.max_steps - step)
        record = {"step": step, "split": "train", "loss": self.state.loss_sum / self.state.loss_steps,
                  **{name: total / self.state.loss_steps for name, total in self.state.metric_sums.items()},
                  "lr": self._lr, "grad_norm": float(self._grad_norm), "tokens": self.state.tokens,
                  "tokens_per_s": tok_s}
        if self.flops_per_token:
            record["tflops"] = tok_s * self.flops_per_token / 1e12
            if self.peak_flops:
                record["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        self._count_time()
        record["elapsed_s"] = round(self.state.train_seconds, 3)
        if self.metrics is not None:
            self.metrics.write(record)
        self.log(f"step {step:>6}/{self.loop.max_steps} {_bar(step / self.loop.max_steps)} | "
                 f"loss {record['loss']:.4f} | lr {self._lr:.2e} | {human(tok_s)} tok/s | ETA {duration(eta)}")
        self.state.loss_sum, self.state.loss_steps, self.state.metric_sums = 0.0, 0, {}
        self._window = (time.perf_counter(), self.state.tokens)

    def _plot(self) -> None:
        if self.metrics is not None:
            plot_losses(self.metrics.path, self.run_dir / "plots" / "loss.png", title=self.run_dir.name)

    def fit(self) -> dict[str, float] | None:
        loop = self.loop
        if self.state.step >= loop.max_steps:
            self.log(f"{self.run_dir} already finished {self.state.step} steps; raise train.max_steps to continue")
            return None
        self.model.train()
        self._clock = time.perf_counter()
        self._window = (time.perf_counter(), self.state.tokens)
        self._run_start = (time.perf_counter(), self.state.step)
        self._last_save = time.monotonic()
        try:
            return self._fit(loop)
        except BaseException:
            self.checkpointer.abandon()  # a background write that already finished is still kept
            raise

    def _fit(self, loop: TrainLoopConfig) -> dict[str, float] | None:
        # The verb's handlers (installed before its set-up) or, for a library call, the loop's own.
        with training_signals(self.log) as signals:
            self._signals = signals
            try:
                return self._loop(loop, signals)
            finally:
                self._signals = None

    def _loop(self, loop: TrainLoopConfig, signals: RunSignals) -> dict[str, float] | None:
        while self.state.step < loop.max_steps:
            result = self.train_step()
            if result is not None:
                self._pending.append(result)
            step = self.state.step
            if (step % loop.log_every == 0 or step == loop.max_steps) and self._pending_or_logged():
                self._log_train(step)
            best_unsaved = False
            if loop.eval_every and step % loop.eval_every == 0 and step != loop.max_steps:
                self.evaluate()
                best_unsaved = loop.save_best and self.state.best_step == step
            stop, save_now = self._boundary_requests(signals)
            if step == loop.max_steps:
                break
            if stop:
                # A step boundary: weights, optimizer, loader and RNG agree, so the resume is exact.
                self._stop_saved(self.save(), signals)
            if save_now or best_unsaved or (loop.save_every and step % loop.save_every == 0):
                folder = self.save()
                if self._stop_agreed(signals):  # asked during that save: it is the checkpoint to stop on
                    self._stop_saved(folder, signals)
        # The final evaluation and save run to the end also when a stop signal comes meanwhile.
        result = self.evaluate()
        folder = self.save()
        self.finish_saving()
        if self._stop_agreed(signals):
            self._stop_saved(folder, signals, final=True)
        self._plot()
        self.log(f"saved {folder}")
        return result

    def _stop_agreed(self, signals: RunSignals) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return any_rank(signals.stop_signal is not None, self.device)

    def _stop_saved(self, folder: Path, signals: RunSignals, final: bool = False) -> None:
        """Stop after the checkpoint in `folder`: seal it, say so in one line, raise StopRequested."""
        self.finish_saving()
        self._plot()
        name = signals.stop_signal or "SIGTERM"  # another rank may have been the one signalled
        what = "interrupted" if name == "SIGINT" else f"terminated ({name})"
        message = (f"{what} at the end of the run: saved {folder}, the last step; the run is complete" if final
                   else f"{what}: saved {folder}; run the same command to resume")
        self.log(message)
        raise StopRequested(message, SIGNAL_EXIT_CODES.get(name, 143))

    def _count_time(self) -> None:
        """Add the seconds since the last count to the run's training time (kept in checkpoints)."""
        now = time.perf_counter()
        self.state.train_seconds += now - getattr(self, "_clock", now)
        self._clock = now

    def warn(self, message: str) -> None:
        """A warning said once (rank 0) and kept in run/events.jsonl for the report."""
        if self.where.is_main:
            record_event(self.run_dir, message, self.state.step)

    def _pending_or_logged(self) -> bool:
        return bool(self._pending) or self.state.loss_steps > 0

    def _boundary_requests(self, signals: RunSignals) -> tuple[bool, bool]:
        """(stop, save now) agreed by every rank: a signal may reach one process only, and the
        time-based save must not depend on each rank's clock."""
        signals.announce()
        minutes = self.loop.save_every_minutes
        due = bool(minutes) and time.monotonic() - self._last_save >= 60 * minutes
        flags = [signals.stop_signal is not None, signals.save_requested or due]
        if self.where.active:  # one small all-reduce per step
            flags = any_rank_each(flags, self.device)
        signals.save_requested = False
        return flags[0], flags[1]


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return f"{100 * fraction:3.0f}% [{'#' * filled}{'.' * (width - filled)}]"


class _ModelAndObjective(nn.Module):
    """The model and an objective's own parameters as one module: what the optimizer's state is keyed
    by when the objective trains parameters of its own."""

    def __init__(self, model: nn.Module, objective_parameters: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective_parameters
