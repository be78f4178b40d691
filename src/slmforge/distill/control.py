"""The control of `slmforge distill`: says when the teacher makes the student worse than it would be
alone. Two measurements, reached through the objective's hooks: an alone twin beside the student early
in the run (`AloneTwin`), and the teacher's loss on the validation batches (`HeldOutControl`).

What both keep between steps is their `state_dict` (through the objective's, for the checkpoints), so
a resumed run can give the verdict an uninterrupted one gives; under torchrun (DDP) the twin trains on
every rank's share of the batch with its gradient summed over the ranks, so 2 processes give the verdict
of 1."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slmforge.distill.config import DistillConfig
from slmforge.formatting import say

CAUGHT_UP = 0.01
"""The student has caught up with its teacher when its held-out loss is within 1% of the teacher's."""
WORSE = 0.01
"""The twin's verdict: the distilled student is worse when its loss is 1% above the twin's."""


def several_processes() -> bool:
    return dist.is_available() and dist.is_initialized()


def summed_over_ranks(values: list[float]) -> list[float]:
    """`values` summed over every process (float64; itself on one process). A collective."""
    if not several_processes():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


class HeldOutControl:
    """Says, once per run, when the student has caught up with its teacher on the validation batches (held
    out): its loss there within 1% of the teacher's, or below it. With a fixed alpha < 1 the teacher then
    holds the student at its own level, where its own loss could take it further (a weak or untrained
    teacher ends here). Decided on the batches measured so far in a validation pass (on each process, its
    share of them)."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.warned = False
        self.training_resumed(-1)

    def training_resumed(self, step: int) -> None:
        """Step `step` starts: the validation pass before it (if any) is over; the next one follows it."""
        self.step = step + 1
        self.tokens = 0
        self.student_sum = self.teacher_sum = 0.0

    def add(self, student_loss: float, teacher_loss: float, tokens: int, alpha: float) -> None:
        self.tokens += tokens
        self.student_sum += student_loss * tokens
        self.teacher_sum += teacher_loss * tokens
        message = self.verdict(alpha)
        if message and not self.warned:
            self.warned = True
            say(f"warning: {message}")

    def verdict(self, alpha: float) -> str | None:
        """The warning the validation batches measured so far in this pass call for, or None."""
        if self.cfg.adaptive or alpha >= 1.0 or self.tokens == 0:
            return None  # adaptive alpha moves to the student's own loss by itself when the teacher stops helping
        student, teacher = self.student_sum / self.tokens, self.teacher_sum / self.tokens
        if student > teacher * (1 + CAUGHT_UP):
            return None
        return (f"distill: at step {self.step} the student's held-out loss ({student:.4f}) has reached its teacher's "
                f"({teacher:.4f}): with a fixed alpha {alpha:g} the teacher holds it at its own level, and its own "
                f"loss could take it further; raise distill.alpha (1 = no teacher), set distill.adaptive = true, or "
                f"use a stronger teacher")


class AloneTwin:
    """The control's counterfactual: a copy of the student as it starts, trained on its own loss alone,
    on the same batches with the run's optimizer, learning-rate schedule and clipping, beside the student
    for the first `steps` steps. Both are scored on each batch before training on it (prequential: a
    batch neither has trained on yet); over the second half of the window, a distilled student whose own
    loss is 1% or more above the twin's is said to be worse than it would be alone. The twin then goes.

    It draws no random numbers from the run's generators (dropout runs under a forked RNG), so the run
    trains exactly as without it. Under DDP each rank trains it on its share of the batch and the ranks
    sum its gradient, targets and scores, so every rank holds the same twin and the verdict is 1
    process's (to float rounding: the sums are added in another order). Not under FSDP2 (the student's
    weights are shards there; said in one line). Its weights, optimizer state and scores are its
    `state_dict`, for the checkpoints (through the objective's); a resume into its window from a
    checkpoint without them gives no verdict, and says so."""

    def __init__(self, steps: int, training):
        self.steps = steps
        self.optim, self.schedule, self.loop = training  # the run's [optim], [schedule] and [train]
        self.model = self.optimizer = None
        self.window = 0
        self.max_steps = 0
        self.state = "waiting"  # -> "running" -> "done"
        self.step = 0
        self.step_targets = 0
        self.pending = False  # trained on a batch since its last update: on every rank alike (each trains on its share)
        self.student_sum = self.twin_sum = 0.0
        self.tokens = 0
        self.saved: dict[str, Any] | None = None  # restored weights and optimizer state, loaded at the next batch

    def advance(self, step: int, max_steps: int) -> None:
        """The trainer starts step `step`: apply the twin's update for the step before, or finish. On every
        rank at once (the update and the verdict sum over ranks)."""
        self.max_steps = max_steps
        if self.state == "waiting":
            self.window = min(self.steps, max_steps // 2)
            if self.window < 2:
                self.state = "done"  # no room for a window with a second half
            elif step > 0:
                self.state = "done"
                if step < self.window:
                    say(f"distill control: resumed at step {step}, inside the alone twin's steps 0-{self.window - 1}, "
                        f"from a checkpoint that does not hold the twin: no twin verdict in this run (the held-out "
                        f"check still runs)")
        if self.state != "running":
            self.step = step
            return
        if self.pending:
            self._update(step - 1, max_steps)
        self.step = step
        if step >= self.window:
            self._finish()

    @torch.compiler.disable
    def start(self, model: nn.Module) -> None:
        self.state = "done"
        if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP2: each rank holds shards (DTensors)
            say("distill control: no alone twin under FSDP2 (the student's weights are sharded); the held-out "
                "check still runs")
            return
        self._build(model)
        self.state = "running"

    def _build(self, model: nn.Module) -> None:
        from slmforge.train.optim import build_optimizer

        self.model = copy.deepcopy(model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.optim, next(model.parameters()).device.type)

    @torch.compiler.disable
    def train_on(self, student, model: nn.Module, batch: dict[str, torch.Tensor], student_hard: torch.Tensor,
                 count: int) -> None:
        """Score the twin on this rank's batch (and the student's loss, measured before), accumulate its
        gradient (a sum over the batch's targets)."""
        if self.model is None:  # restored from a checkpoint: the student's structure, the saved weights
            self._build(model)
            self.model.load_state_dict(self.saved["weights"])
            self.optimizer.load_state_dict(self.saved["optimizer"])
            self.saved = None
        self.pending = True
        if count == 0:
            return  # a masked-LM share without targets: nothing to score or learn (the ranks sum what there is)
        devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            projection, targets = student.predictions(self.model, batch)
            loss, _ = student.head_loss(projection, targets)
            (loss * count).backward()  # a sum over targets: the step divides by all of its targets
        self.step_targets += count
        if self.step >= self.window // 2:  # the second half: where the teacher's effect shows
            self.student_sum += float(student_hard) * count
            self.twin_sum += float(loss.detach()) * count
            self.tokens += count

    def _update(self, step: int, max_steps: int) -> None:
        from slmforge.train.optim import learning_rate

        parameters = [p for p in self.model.parameters() if p.requires_grad]
        (targets,) = summed_over_ranks([float(self.step_targets)])
        if several_processes():  # one all-reduce of every gradient, and of which ones any rank has
            has_grad = torch.tensor([float(p.grad is not None) for p in parameters], dtype=parameters[0].dtype,
                                    device=parameters[0].device)
            flat = torch.cat([has_grad, *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                          for p in parameters]])
            dist.all_reduce(flat)
            pieces = flat[len(parameters):].split([p.numel() for p in parameters])
            for p, any_grad, piece in zip(parameters, flat[:len(parameters)].tolist(), pieces):
                p.grad = piece.view_as(p).clone() if any_grad else None  # none on any rank: skipped, as on one
        parameters = [p for p in parameters if p.grad is not None]
        for p in parameters:
            p.grad /= max(targets, 1.0)
        if self.loop.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.loop.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, max_steps, self.optim, self.schedule)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_targets = 0
        self.pending = False

    def verdict(self) -> tuple[bool, str]:
        """(worse, the sentence saying how the student compares with its twin), from this process's sums
        (`_finish` sums them over the ranks first)."""
        student, twin = self.student_sum / self.tokens, self.twin_sum / self.tokens
        worse = student > twin * (1 + WORSE)
        return worse, (f"distill: over steps {self.window // 2}-{self.window - 1}, on each batch before training on "
                       f"it, the student's own loss averaged {student:.4f}, a twin of it trained alone on the same batches "
                       f"(same start, optimizer and schedule) {twin:.4f}")

    def _finish(self) -> None:
        self.state = "done"
        self.model = self.optimizer = self.saved = None  # its memory goes back
        self.student_sum, self.twin_sum, self.tokens = summed_over_ranks([self.student_sum, self.twin_sum,
                                                                          float(self.tokens)])
        if not self.tokens:
            return
        worse, sentence = self.verdict()
        gap = self.student_sum / self.tokens - self.twin_sum / self.tokens
        if worse:
            say(f"warning: {sentence}: with these settings the teacher makes it worse than it would be alone; "
                f"try distill.temperature = 1, distill.adaptive = true, or a stronger teacher")
        elif gap <= 0:
            say(f"{sentence}: the teacher helps so far ({-gap:.4f} lower than alone)")
        else:  # behind, but by less than the warning's share: said, so the reader need not compare numbers
            say(f"{sentence}: the student is {gap:.4f} behind its twin, less than the {WORSE:.0%} that warns; "
                f"compare the validation loss with a run of distill.alpha = 1 before trusting this teacher")

    # ------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Where the twin stands at a step boundary, on every rank alike (a collective: the update of the
        step just trained, which `advance` would apply next, is applied now, so no gradient is kept).
        Tensors and plain values only: the trainer state is read back with weights_only."""
        if self.state == "running" and self.pending:
            self._update(self.step, self.max_steps)
        state = {"state": self.state, "window": self.window, "step": self.step, "student_sum": self.student_sum,
                 "twin_sum": self.twin_sum, "tokens": self.tokens}
        if self.state == "running":
            if self.model is not None:
                state["weights"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                state["optimizer"] = self.optimizer.state_dict()
            else:  # restored and saved again before training on a batch
                state.update(weights=self.saved["weights"], optimizer=self.saved["optimizer"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.window, self.step = state["state"], state["window"], state["step"]
        self.student_sum, self.twin_sum, self.tokens = state["student_sum"], state["twin_sum"], state["tokens"]
        self.step_targets, self.pending = 0, False
        self.model = self.optimizer = None
        self.saved = ({"weights": state["weights"], "optimizer": state["optimizer"]} if self.state == "running"
                      else None)
