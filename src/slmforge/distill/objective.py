"""The student's own objective plus a distillation term:

    loss = alpha * hard + (1 - alpha) * D(teacher || student)

at the positions the student's objective scores (every next token for causal LM, the masked ones
for masked LM), with both models reading the same (masked) input. Validation measures the student
alone, on its own objective, so its figures compare with a student trained without a teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.distill.cache import TeacherCache
from slmforge.distill.config import DistillConfig
from slmforge.distill.teacher import Teacher
from slmforge.errors import SlmforgeError
from slmforge.objectives.base import IGNORE_INDEX, TrainingHooks, sample_ids
from slmforge.objectives.divergence import chunked_divergence, topk_forward_kl


class Distillation(TrainingHooks):
    def __init__(self, student, teacher: Teacher | None, cfg: DistillConfig, cache: TeacherCache | None = None,
                 projection: nn.Module | None = None):
        self.student, self.teacher, self.cfg, self.cache = student, teacher, cfg, cache
        self.projection = projection
        """student features -> teacher width, for hidden-state matching (None: same width, or off)."""
        self.name = f"{student.name} + {cfg.divergence} distillation"
        self.kinds = student.kinds
        self.metric_names = (*student.metric_names, "hard_loss", "distill_loss",
                             *(("hidden_loss",) if cfg.hidden_weight else ()))
        self.bits_per_byte = student.bits_per_byte
        self.progress = 0.0

    @property
    def eval_metric_names(self) -> tuple[str, ...]:
        return self.student.metric_names  # validation measures the student alone

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

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not model.training:  # validation: the student alone
            return self.student.loss(model, batch)
        projection, targets = self.student.predictions(model, batch)
        hard, correct = self.student.head_loss(projection, targets)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        alpha, temperature = self.cfg.at(self.progress)
        teacher_projection = None
        if self.cfg.hidden_weight:
            teacher_projection = self._teacher_predictions(batch)
        if alpha >= 1.0:
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
                                      self.cfg.chunk_rows, None if self.teacher.identity else self.teacher.to_teacher)
        loss = hard if alpha >= 1.0 else alpha * hard + (1 - alpha) * soft
        metrics = {"accuracy": correct / count, "hard_loss": hard.detach(), "distill_loss": soft.detach()}
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
