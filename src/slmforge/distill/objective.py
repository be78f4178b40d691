"""The student's own objective plus a distillation term:

    loss = alpha * hard + (1 - alpha) * D(teacher || student)

at the positions the student's objective scores (every next token for causal LM, the masked ones
for masked LM), with both models reading the same (masked) input. Validation measures the student
alone, on its own objective, so its figures compare with a student trained without a teacher.

alpha is fixed or scheduled ([distill] alpha, alpha_end), or set per batch from the teacher-student gap
(`adaptive_alpha`). The control says when the teacher makes the student worse than it would be alone:
an alone twin beside it early in the run (`AloneTwin`) and the teacher's loss on the validation batches
(`HeldOutControl`), both reached through the objective's hooks (loss, set_progress, eval metrics).
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.distill.cache import TeacherCache
from slmforge.distill.config import DistillConfig
from slmforge.distill.teacher import Teacher
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.models.heads import OutputProjection
from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks, sample_ids
from slmforge.objectives.divergence import chunked_divergence, topk_forward_kl


class Distillation(TrainingHooks):
    def __init__(self, student, teacher: Teacher | None, cfg: DistillConfig, cache: TeacherCache | None = None,
                 projection: nn.Module | None = None, training: tuple | None = None):
        """`training`: the run's ([optim], [schedule], [train]), how the control's alone twin trains
        (None: no twin)."""
        self.student, self.teacher, self.cfg, self.cache = student, teacher, cfg, cache
        self.projection = projection
        """student features -> teacher width, for hidden-state matching (None: same width, or off)."""
        self.name = f"{student.name} + {cfg.divergence} distillation"
        self.kinds = student.kinds
        self.metric_names = (*student.metric_names, "hard_loss", "distill_loss",
                             *(("alpha", "teacher_loss") if cfg.adaptive else ()),
                             *(("hidden_loss",) if cfg.hidden_weight else ()))
        self.bits_per_byte = student.bits_per_byte
        self.progress = 0.0
        # The held-out control needs the teacher's own loss on the validation batches (not in a cache);
        # the twin needs the run's optimizer settings (`training`).
        taught = cfg.adaptive or cfg.alpha < 1 or (cfg.alpha_end is not None and cfg.alpha_end < 1)
        control = cfg.control and taught  # a student that never hears its teacher needs no control
        self.control = HeldOutControl(cfg) if control and teacher is not None else None
        self.twin = (AloneTwin(cfg.control_steps, training)
                     if control and cfg.control_steps and training is not None else None)

    @property
    def eval_metric_names(self) -> tuple[str, ...]:
        # validation measures the student alone; the teacher's loss on the same batches rides beside it
        return (*self.student.metric_names, *(("teacher_loss",) if self.control is not None else ()))

    @property
    def head_loss(self):
        """The student objective's loss kernel (the trainer sets it, as for any objective)."""
        return self.student.head_loss

    @head_loss.setter
    def head_loss(self, value) -> None:
        self.student.head_loss = value

    def window_tokens(self, seq_len: int) -> int:
        return self.student.window_tokens(seq_len)

    def collate(self, raw: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        batch = self.student.collate(raw, seed)
        if self.cache is not None:  # the cache is read by sample
            batch["sample_ids"] = sample_ids(raw)
        return batch

    def _teacher_predictions(self, batch: dict[str, torch.Tensor]):
        teacher_batch = dict(batch)
        if not self.teacher.identity:
            teacher_batch["input_ids"] = self.teacher.to_teacher[batch["input_ids"]]
        with torch.no_grad():
            projection, _ = self.student.predictions(self.teacher.model, teacher_batch)
        return projection

    def trainable_module(self) -> nn.Module | None:
        """Parameters trained beside the student (the trainer optimizes and saves them)."""
        return self.projection

    def set_progress(self, step: int, max_steps: int) -> None:
        """Where scheduled alpha and temperature stand (the trainer calls this before each step)."""
        self.progress = min(step / max(max_steps - 1, 1), 1.0)
        if self.control is not None:
            self.control.training_resumed(step)
        if self.twin is not None:
            self.twin.advance(step, max_steps)

    def _teacher_hard_loss(self, teacher_projection, targets: torch.Tensor) -> torch.Tensor:
        """The teacher's own loss on the student's targets, over the student's vocabulary."""
        if not self.teacher.identity:
            columns = self.teacher.to_teacher
            teacher_projection = OutputProjection(
                teacher_projection.features, teacher_projection.weight.index_select(0, columns),
                None if teacher_projection.bias is None else teacher_projection.bias.index_select(0, columns),
                teacher_projection.softcap)
        with torch.no_grad():
            return self.student.head_loss(teacher_projection, targets)[0].float()

    def _validation_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student alone on its own objective; with the control on, the teacher's loss on the same
        targets beside it (see `HeldOutControl`)."""
        if self.control is None:
            return self.student.loss(model, batch)
        projection, targets = self.student.predictions(model, batch)
        hard, correct = self.student.head_loss(projection, targets)
        teacher = self._teacher_hard_loss(self._teacher_predictions(batch), targets)
        alpha, _ = self.cfg.at(self.progress)
        count = (targets != IGNORE_INDEX).sum()
        self.control.add(float(hard), float(teacher), int(count), alpha)
        return hard, {"accuracy": correct / count.clamp(min=1), "teacher_loss": teacher}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not model.training:  # validation: the student alone
            return self._validation_loss(model, batch)
        projection, targets = self.student.predictions(model, batch)
        hard, correct = self.student.head_loss(projection, targets)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        if self.twin is not None and self.twin.state != "done":
            if self.twin.state == "waiting":
                self.twin.start(model)  # the student as it starts: the first step has not updated it
            if self.twin.state == "running":
                self.twin.train_on(self.student, batch, hard.detach(), count)
        alpha, temperature = self.cfg.at(self.progress)
        columns = None if self.teacher is None or self.teacher.identity else self.teacher.to_teacher
        teacher_projection = None
        if self.cfg.hidden_weight or self.cfg.adaptive:
            teacher_projection = self._teacher_predictions(batch)
        if alpha >= 1.0 and not self.cfg.adaptive:
            soft = torch.zeros((), device=hard.device)
        elif self.cache is not None:
            ids, logits = self.cache.lookup(batch["sample_ids"].cpu())
            rows = projection.features.numel() // projection.features.shape[-1]
            if ids.shape[0] != rows:
                raise SlmforgeError(f"distill.teacher_cache: {ids.shape[0]} cached positions for a batch that scores "
                                    f"{rows}; the cache was built for other masks or data")
            soft = topk_forward_kl(projection, ids, logits, temperature, self.cfg.chunk_rows)
        else:
            if teacher_projection is None:
                teacher_projection = self._teacher_predictions(batch)
            soft = chunked_divergence(projection, teacher_projection, self.cfg.divergence, temperature,
                                      self.cfg.chunk_rows, columns)
        metrics = {"accuracy": correct / count, "hard_loss": hard.detach(), "distill_loss": soft.detach()}
        if self.cfg.adaptive:
            teacher_hard = self._teacher_hard_loss(teacher_projection, targets)
            alpha = adaptive_alpha(hard.detach().float(), teacher_hard, self.cfg.adaptive_margin)
            metrics.update(alpha=alpha, teacher_loss=teacher_hard)
        loss = hard if isinstance(alpha, float) and alpha >= 1.0 else alpha * hard + (1 - alpha) * soft
        if self.cfg.hidden_weight:
            matched = hidden_distance(projection.features, teacher_projection.features, self.projection,
                                      self.cfg.hidden_loss)
            loss = loss + self.cfg.hidden_weight * matched
            metrics["hidden_loss"] = matched.detach()
        return loss, metrics


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None,
                    kind: str) -> torch.Tensor:
    """Mean distance between the student's features (projected to the teacher's width) and the
    teacher's, row by row: 1 - cosine similarity, or the mean squared difference."""
    student = student.reshape(-1, student.shape[-1]).float()
    teacher = teacher.reshape(-1, teacher.shape[-1]).float().detach()
    if projection is not None:
        student = projection(student)
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return ((student - teacher) ** 2).mean()


def adaptive_alpha(hard: torch.Tensor, teacher_hard: torch.Tensor, margin: float) -> torch.Tensor:
    """alpha for one batch, from the gap between the student's hard loss and the teacher's on it:

        alpha = clip(1 - (hard - teacher_hard) / (margin x hard), 0, 1)

    0 (all teacher) while the teacher's loss is at least `margin` (a share of the student's loss) below
    the student's, rising linearly to 1 (the student's own loss only) as the gap closes, and 1 once the
    student predicts the batch as well as its teacher, or a teacher predicts it worse. A teacher's soft
    targets teach faster than the labels while the student is far behind it; near the teacher they only
    pull the student to the teacher's level, where its own loss can take it further. A share of the
    loss, not nats, so the margin means the same at any vocabulary. Nothing is kept between batches: a
    resumed run computes the same alphas."""
    return (1.0 - (hard - teacher_hard) / (margin * hard.clamp(min=1e-6))).clamp(0.0, 1.0).detach()


CAUGHT_UP = 0.01
"""The student has caught up with its teacher when its held-out loss is within 1% of the teacher's."""
WORSE = 0.01
"""The twin's verdict: the distilled student is worse when its loss is 1% above the twin's."""


class HeldOutControl:
    """Says, once per run, when the student has caught up with its teacher on the validation batches (held
    out): its loss there within 1% of the teacher's, or below it. With a fixed alpha < 1 the teacher then
    holds the student at its own level, where its own loss could take it further (a weak or untrained
    teacher ends here). Decided on the batches measured so far in a validation pass."""

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
    trains exactly as without it. It runs on one process from step 0 (not under torchrun, not after a
    resume into the window)."""

    def __init__(self, steps: int, training):
        self.steps = steps
        self.optim, self.schedule, self.loop = training  # the run's [optim], [schedule] and [train]
        self.model = self.optimizer = None
        self.window = 0
        self.state = "waiting"  # -> "running" -> "done"
        self.step = 0
        self.step_targets = 0
        self.student_sum = self.twin_sum = 0.0
        self.tokens = 0

    def advance(self, step: int, max_steps: int) -> None:
        """The trainer starts step `step`: apply the twin's update for the step before, or finish."""
        if self.state == "waiting":
            self.window = min(self.steps, max_steps // 2)
            if step > 0 or self.window < 2:
                self.state = "done"  # resumed (it would not start where the student started), or no room
        if self.state != "running":
            self.step = step
            return
        if self.step_targets:
            self._update(step - 1, max_steps)
        self.step = step
        if step >= self.window:
            self._finish()

    @torch.compiler.disable
    def start(self, model: nn.Module) -> None:
        import copy

        import torch.distributed as dist

        self.state = "done"
        if dist.is_available() and dist.is_initialized():
            say("distill control: no alone twin under several processes (it would train on one rank's share)")
            return
        from slmforge.train.optim import build_optimizer

        self.model = copy.deepcopy(model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.optim, next(model.parameters()).device.type)
        self.state = "running"

    @torch.compiler.disable
    def train_on(self, student, batch: dict[str, torch.Tensor], student_hard: torch.Tensor,
                 count: torch.Tensor) -> None:
        """Score the twin on the batch (and the student's loss, measured before), accumulate its gradient."""
        devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            projection, targets = student.predictions(self.model, batch)
            loss, _ = student.head_loss(projection, targets)
            (loss * count).backward()  # a sum over targets: the step divides by all of its targets
        self.step_targets += int(count)
        if self.step >= self.window // 2:  # the second half: where the teacher's effect shows
            self.student_sum += float(student_hard) * int(count)
            self.twin_sum += float(loss.detach()) * int(count)
            self.tokens += int(count)

    def _update(self, step: int, max_steps: int) -> None:
        from slmforge.train.optim import learning_rate

        parameters = [p for p in self.model.parameters() if p.grad is not None]
        for p in parameters:
            p.grad /= self.step_targets
        if self.loop.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.loop.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, max_steps, self.optim, self.schedule)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_targets = 0

    def verdict(self) -> tuple[bool, str]:
        """(worse, the sentence saying how the student compares with its twin)."""
        student, twin = self.student_sum / self.tokens, self.twin_sum / self.tokens
        worse = student > twin * (1 + WORSE)
        return worse, (f"distill: over steps {self.window // 2}-{self.window - 1}, on each batch before training on "
                       f"it, the student's own loss averaged {student:.4f}, a twin of it trained alone on the same batches "
                       f"(same start, optimizer and schedule) {twin:.4f}")

    def _finish(self) -> None:
        self.state = "done"
        self.model = self.optimizer = None  # its memory goes back
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
