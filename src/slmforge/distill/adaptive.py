"""Adaptive alpha (`distill.adaptive`): the weight of the student's own loss set per batch from the gap
between its hard loss and the teacher's on the same targets, optionally smoothed over steps
(`distill.adaptive_smoothing`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from slmforge.distill.control import several_processes


def adaptive_alpha(hard: torch.Tensor, teacher_hard: torch.Tensor, margin: float) -> torch.Tensor:
    """alpha for one batch, from the gap between the student's hard loss and the teacher's on it:

        alpha = clip(1 - (hard - teacher_hard) / (margin x hard), 0, 1)

    0 (all teacher) while the teacher's loss is at least `margin` (a share of the student's loss) below
    the student's, rising linearly to 1 (the student's own loss only) as the gap closes, and 1 once the
    student predicts the batch as well as its teacher, or a teacher predicts it worse. A teacher's soft
    targets teach faster than the labels while the student is far behind it; near the teacher they only
    pull the student to the teacher's level, where its own loss can take it further. A share of the
    loss, not nats, so the margin means the same at any vocabulary."""
    return (1.0 - (hard - teacher_hard) / (margin * hard.clamp(min=1e-6))).clamp(0.0, 1.0).detach()


class AdaptiveAlpha:
    """alpha per micro-batch from the relative gap (hard - teacher) / hard. With `smoothing` s > 0 the gap
    is s x (its moving average over the steps before) + (1 - s) x the batch's, the average updated once
    per step with the step's gap over all its targets: a masked-LM batch of a few dozen masked tokens
    gives a noisy gap, and alpha then jumps from batch to batch.

    Under torchrun the batch's losses are summed over the ranks first (one small all-reduce per
    micro-batch), so every rank uses the alpha one process would; the average is the same on every rank
    and rides in the checkpoints (`state_dict`), so a resumed run computes the same alphas."""

    def __init__(self, margin: float, smoothing: float):
        self.margin, self.smoothing = margin, smoothing
        self.average: torch.Tensor | None = None  # the moving average of the gap, through the step before
        self.step_hard = self.step_teacher = None  # the current step's summed losses (over its targets)

    @torch.compiler.disable
    def __call__(self, hard: torch.Tensor, teacher_hard: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """alpha for a micro-batch whose mean hard loss is `hard`, the teacher's `teacher_hard`, over
        `count` targets (on this process; a tensor, so that no value waits for the device)."""
        count = count.float()
        if several_processes():
            # a share without targets adds nothing (its mean losses are 0/0)
            sums = torch.where(count > 0, torch.stack([hard.float() * count, teacher_hard.float() * count, count]),
                               torch.zeros(3, device=hard.device))
            dist.all_reduce(sums)
            hard, teacher_hard, count = sums[0] / sums[2].clamp(min=1), sums[1] / sums[2].clamp(min=1), sums[2]
        if self.smoothing:
            weighted = (hard.detach().float() * count, teacher_hard.detach().float() * count)
            if self.step_hard is None:
                self.step_hard, self.step_teacher = weighted
            else:
                self.step_hard, self.step_teacher = self.step_hard + weighted[0], self.step_teacher + weighted[1]
        if self.average is None or not self.smoothing:
            return adaptive_alpha(hard, teacher_hard, self.margin)
        gap = (hard - teacher_hard) / hard.clamp(min=1e-6)
        smoothed = self.smoothing * self.average + (1 - self.smoothing) * gap
        return (1.0 - smoothed / self.margin).clamp(0.0, 1.0).detach()

    def step_done(self) -> None:
        """The step's gap (over all of its targets) joins the moving average (the trainer starts the next)."""
        if self.step_hard is None:
            return
        gap = (self.step_hard - self.step_teacher) / self.step_hard.clamp(min=1e-6)
        self.average = gap if self.average is None else self.smoothing * self.average + (1 - self.smoothing) * gap
        self.step_hard = self.step_teacher = None

    def state_dict(self) -> dict[str, Any]:
        """At a step boundary: the step just trained is folded into the average first."""
        self.step_done()
        return {"average": None if self.average is None else float(self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = None if state["average"] is None else torch.tensor(state["average"])
