"""The one training loop. Pretraining, distillation and fine-tuning differ only by the objective
(batch -> loss) and by which parameters have requires_grad; everything else lives here once."""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slmforge.formatting import duration, human
from slmforge.objectives.base import batch_generator, mean_loss, summarize
from slmforge.runs import load_weights, resolve_checkpoint
from slmforge.train.checkpoint import load_state, save_checkpoint
from slmforge.train.config import OptimConfig, ScheduleConfig, TrainLoopConfig
from slmforge.train.metrics import MetricsLog, plot_losses
from slmforge.train.optim import build_optimizer, learning_rate


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    # running sums since the last log line, kept in the checkpoint so a resumed run logs the same
    loss_sum: float = 0.0
    loss_steps: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, *, model: nn.Module, objective, train_loader, loop: TrainLoopConfig, optim: OptimConfig,
                 schedule: ScheduleConfig, run_dir: str | Path, metrics: MetricsLog, device: torch.device,
                 precision: str = "fp32", val_batches: Callable[[], Iterable[dict]] | None = None,
                 val_bytes_per_token: float | None = None, checkpoint_meta: dict[str, Any] | None = None,
                 flops_per_token: float | None = None, seed: int = 0, rank: int = 0, log=None):
        self.model = model
        self.objective = objective
        self.loader = train_loader
        self.loop, self.optim_cfg, self.schedule = loop, optim, schedule
        self.run_dir = Path(run_dir)
        self.metrics = metrics
        self.device = device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        self.val_batches = val_batches
        self.val_bytes_per_token = val_bytes_per_token
        self.checkpoint_meta = checkpoint_meta or {}
        self.flops_per_token = flops_per_token
        self.seed, self.rank = seed, rank
        self.optimizer = build_optimizer(model, optim, device.type)
        self.state = TrainState()
        self._pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # ------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        self._collect_losses()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"trainer": vars(self.state).copy(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TrainState(**{"metric_sums": {}, **state["trainer"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def resume_from(self, checkpoint: str | Path) -> None:
        step_dir = resolve_checkpoint(checkpoint)
        load_weights(self.model, step_dir)
        self.load_state_dict(load_state(step_dir))
        self.metrics.truncate_after(self.state.step)
        self.log(f"resumed from {step_dir} at step {self.state.step}")

    def save(self) -> Path:
        meta = {**self.checkpoint_meta, "tokens_seen": self.state.tokens}
        return save_checkpoint(self.run_dir, self.state.step, self.model, state=self.state_dict(),
                               extra_meta=meta, keep_last=self.loop.keep_last or None)

    # ------------------------------------------------------------ the loop

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over grad_accum micro-batches; returns the mean loss and metrics."""
        lr = learning_rate(self.state.step, self.loop.max_steps, self.optim_cfg, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Losses and the gradient norm stay on the device until a log line needs them: reading them
        # every step would make the host wait for the GPU instead of preparing the next batch.
        total = torch.zeros((), device=self.device)
        metric_totals: dict[str, torch.Tensor] = {}
        for micro in range(self.loop.grad_accum):
            # The objective makes inputs and targets (shift, masking) with a generator of
            # (seed, step, micro-batch, rank): a resumed run draws the same masks.
            generator = batch_generator(self.seed, self.state.step, micro, self.rank)
            batch = self.objective.collate(self.loader.next_batch(), generator)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast:
                loss, metrics = self.objective.loss(self.model, batch)
            (loss / self.loop.grad_accum).backward()
            total += loss.detach().float()
            for name, value in metrics.items():
                metric_totals[name] = metric_totals.get(name, 0.0) + value.detach().float()
            self.state.tokens += batch["input_ids"].numel()
        # The norm is logged even without clipping (max_norm=inf measures without scaling).
        max_norm = self.loop.clip_grad if self.loop.clip_grad > 0 else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._lr = lr
        n = self.loop.grad_accum
        return total / n, {name: value / n for name, value in metric_totals.items()}

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
        return [p for p in self.model.parameters() if p.requires_grad]

    def evaluate(self) -> dict[str, float] | None:
        if self.val_batches is None:
            return None
        means, tokens = mean_loss(self.model, self.objective, self.val_batches(), self.device, self.autocast)
        result = summarize(means, self.val_bytes_per_token if self.objective.bits_per_byte else None)
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
        self.metrics.write(record)
        self.log(f"step {step:>6}/{self.loop.max_steps} {_bar(step / self.loop.max_steps)} | "
                 f"loss {record['loss']:.4f} | lr {self._lr:.2e} | {human(tok_s)} tok/s | ETA {duration(eta)}")
        self.state.loss_sum, self.state.loss_steps, self.state.metric_sums = 0.0, 0, {}
        self._window = (time.perf_counter(), self.state.tokens)

    def fit(self) -> dict[str, float] | None:
        loop = self.loop
        if self.state.step >= loop.max_steps:
            self.log(f"{self.run_dir} already finished {self.state.step} steps; raise train.max_steps to continue")
            return None
        self.model.train()
        self._window = (time.perf_counter(), self.state.tokens)
        self._run_start = (time.perf_counter(), self.state.step)
        with StopOnInterrupt(self.log) as interrupt:
            while self.state.step < loop.max_steps:
                self._pending.append(self.train_step())
                step = self.state.step
                if step % loop.log_every == 0 or step == loop.max_steps:
                    self._log_train(step)
                if loop.eval_every and step % loop.eval_every == 0 and step != loop.max_steps:
                    self.evaluate()
                if loop.save_every and step % loop.save_every == 0 and step != loop.max_steps:
                    self.save()
                if interrupt.requested and step != loop.max_steps:
                    # A step boundary: weights, optimizer, loader and RNG agree, so the resume is exact.
                    folder = self.save()
                    plot_losses(self.metrics.path, self.run_dir / "plots" / "loss.png", title=self.run_dir.name)
                    self.log(f"interrupted: saved {folder}; run the same command to resume")
                    raise KeyboardInterrupt
        result = self.evaluate()
        folder = self.save()
        plot_losses(self.metrics.path, self.run_dir / "plots" / "loss.png", title=self.run_dir.name)
        self.log(f"saved {folder}")
        return result


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return f"{100 * fraction:3.0f}% [{'#' * filled}{'.' * (width - filled)}]"


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop at the next step boundary (and save); a second one
    aborts at once. Only the main thread can own signal handlers; elsewhere this does nothing."""

    def __init__(self, log):
        self.log = log
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
