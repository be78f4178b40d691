"""`slmforge distill`: pretraining (any student family, its own objective) with a teacher's
distributions mixed into the loss. Everything else is `slmforge pretrain`: data, run folder,
checkpoints, exact resume, trackers, torchrun."""

from __future__ import annotations

import os
from pathlib import Path

from slmforge import config as config_io
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.objective import Distillation
from slmforge.distill.teacher import load_teacher
from slmforge.errors import SlmforgeError
from slmforge.formatting import human, say
from slmforge.models import family
from slmforge.train.pretrain import pretrain


def distill(cfg: DistillRunConfig) -> Path:
    def with_teacher(objective, student_family, tokenizer, device):
        if tokenizer is None:
            raise SlmforgeError(f"train.data: {cfg.train.data} names no tokenizer; distillation maps the student's "
                                f"tokens to the teacher's by their strings")
        teacher = load_teacher(cfg.distill.teacher, device, cfg.distill.teacher_dtype, tokenizer)
        teacher_family = family(teacher.model.cfg)
        if teacher_family.kind != student_family.kind:
            raise SlmforgeError(f"distill.teacher: a {teacher_family.name} {teacher_family.kind} cannot teach a "
                                f"{student_family.name} {student_family.kind} (both must predict the same positions)")
        size = sum(p.numel() for p in teacher.model.parameters())
        say(f"teacher {cfg.distill.teacher}: {teacher_family.name}, {human(size)} parameters, "
            f"{next(teacher.model.parameters()).dtype}; {cfg.distill.divergence}, alpha {cfg.distill.alpha:g}, "
            f"T {cfg.distill.temperature:g}")
        meta = {"distill": {**config_io.to_dict(cfg.distill), "teacher_parameters": size,
                            "teacher_family": teacher_family.name}}
        return Distillation(objective, teacher, cfg.distill), meta

    run_dir = pretrain(cfg, extend_objective=with_teacher)
    if os.environ.get("RANK", "0") == "0":  # one process compares (after the process group is gone)
        from slmforge.distill.compare import compare_with_teacher
        from slmforge.runtime import resolve_device

        report = compare_with_teacher(run_dir, cfg, resolve_device(cfg.train.device))
        say(f"teacher {human(report['teacher']['parameters'])} parameters, student "
            f"{human(report['student']['parameters'])} ({report['compression']:.1f}x smaller); "
            f"side by side in {run_dir / 'distill_report.json'}")
    return run_dir
