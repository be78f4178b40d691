"""The student's own objective plus a distillation term:

    loss = alpha * hard + (1 - alpha) * D(teacher || student)

at the positions the student's objective scores (every next token for causal LM, the masked ones
for masked LM), with both models reading the same (masked) input. Validation measures the student
alone, on its own objective, so its figures compare with a student trained without a teacher.

alpha is fixed or scheduled ([distill] alpha, alpha_end), or set per batch from the teacher-student gap
(`AdaptiveAlpha`, distill/adaptive.py). The control (distill/control.py) says when the teacher makes the
student worse than it would be alone: an alone twin beside it early in the run (`AloneTwin`) and the
teacher's loss on the validation batches (`HeldOutControl`), both reached through the objective's hooks
(loss, set_progress, eval metrics). What they keep between steps is the objective's `state_dict` (for the
checkpoint's trainer state, which the trainer saves and restores).
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.distill.adaptive import AdaptiveAlpha
from slmforge.distill.cache import TeacherCache
from slmforge.distill.config import DistillConfig
from slmforge.distill.control import AloneTwin, HeldOutControl
from slmforge.distill.teacher import Teacher
from slmforge.errors import SlmforgeError
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
        self.adaptive = AdaptiveAlpha(cfg.adaptive_margin, cfg.adaptive_smoothing) if cfg.adaptive else None

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
        if self.adaptive is not None:
            self.adaptive.step_done()

    def state_dict(self) -> dict:
        """What the objective keeps between steps, for the checkpoint's trainer state (tensors and plain
        values): the alone twin, the adaptive gap's average, whether the held-out warning was said. Called
        at a step boundary on every rank at once (the twin's last update sums over the ranks)."""
        state = {}
        if self.twin is not None:
            state["twin"] = self.twin.state_dict()
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        if self.control is not None:
            state["held_out_warned"] = self.control.warned
        return state

    def load_state_dict(self, state: dict | None) -> None:
        """A resume: `state` as `state_dict` gave it (None or parts missing: a checkpoint written without
        them; the twin then says, at its first step, that it gives no verdict)."""
        state = state or {}
        if self.twin is not None and "twin" in state:
            self.twin.load_state_dict(state["twin"])
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive.load_state_dict(state["adaptive"])
        if self.control is not None:
            self.control.warned = bool(state.get("held_out_warned", False))

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
        targets_here = (targets != IGNORE_INDEX).sum()
        count = targets_here.clamp(min=1)
        if self.twin is not None and self.twin.state != "done":
            if self.twin.state == "waiting":
                self.twin.start(model)  # the student as it starts: the first step has not updated it
            if self.twin.state == "running":
                self.twin.train_on(self.student, model, batch, hard.detach(), int(targets_here))
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
            alpha = self.adaptive(hard.detach().float(), teacher_hard, targets_here)
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
