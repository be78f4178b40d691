"""`slmforge distill`: pretraining (any student family, its own objective) with a teacher's
distributions mixed into the loss. Everything else is `slmforge pretrain`: data, run folder,
checkpoints, exact resume, trackers, torchrun."""

from __future__ import annotations

import math
import os
from pathlib import Path

from slmforge import config as config_io
from slmforge.distill.cache import TeacherCache, build_cache, describe_cache, epochs_needed
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.objective import Distillation
from slmforge.distill.teacher import is_hf_folder, load_teacher
from slmforge.errors import SlmforgeError
from slmforge.formatting import human, say
from slmforge.models import family
from slmforge.train.pretrain import pretrain


def cache_identity(cfg: DistillRunConfig, manifest: dict) -> dict:
    """What a teacher cache depends on: the teacher, the data, the masks (objective, seed, windows)."""
    from slmforge.train.resume_check import data_fingerprint

    return {"teacher": str(cfg.distill.teacher), "teacher_weights": teacher_fingerprint(cfg.distill.teacher),
            "data_fingerprint": data_fingerprint(manifest),
            "objective": config_io.to_dict(cfg.objective), "seq_len": cfg.train.seq_len, "seed": cfg.train.seed}


def teacher_fingerprint(path: str) -> str:
    """What the teacher's weights are, cheaply: the checksums its step folder recorded, or the names,
    sizes and modification times of a Hugging Face folder's weight files (a teacher run that trained on
    at the same path is a different teacher)."""
    import hashlib

    folder = Path(path)
    if is_hf_folder(folder):
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        text = repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    else:
        from slmforge.checkpoint.reading import CHECKSUMS, WEIGHTS, resolve_checkpoint

        step = resolve_checkpoint(folder)
        listed = step / CHECKSUMS
        text = (listed.read_text(encoding="utf-8") if listed.is_file()
                else repr((step.name, (step / WEIGHTS).stat().st_size if (step / WEIGHTS).is_file() else None)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def required_epochs(cfg: DistillRunConfig, objective, processes: int) -> int:
    """Epochs of the training data a run reaches (what a teacher cache must cover)."""
    from slmforge.data.loader import WindowLoader
    from slmforge.data.shards import ShardSet

    loop = cfg.train
    loader = WindowLoader(ShardSet(loop.data, loop.train_split), loop.seq_len, loop.batch_size * processes,
                          seed=loop.seed, window=objective.window_tokens(loop.seq_len))
    steps = (math.ceil(loop.epochs * loader.batches_per_epoch / loop.grad_accum) if loop.epochs else loop.max_steps)
    return epochs_needed(steps, loop.batch_size * processes, loop.grad_accum, loader.num_windows)


def distill(cfg: DistillRunConfig) -> Path:
    for lang, path in cfg.distill.eval_texts.items():  # before hours of training, not after
        if not Path(path).is_file():
            raise SlmforgeError(f"distill.eval_texts.{lang}: {path}: no such file")

    def with_teacher(objective, student_family, tokenizer, device):
        from slmforge.data.shards import read_manifest

        # The control's alone twin trains as the student does; held by reference, so what the run
        # resolves later (max_steps from epochs) holds for both.
        training = (cfg.optim, cfg.schedule, cfg.train)

        if tokenizer is None:
            raise SlmforgeError(f"train.data: {cfg.train.data} names no tokenizer; distillation maps the student's "
                                f"tokens to the teacher's by their strings")
        if not hasattr(objective, "predictions"):
            raise SlmforgeError(f"objective.kind: {objective.name!r} has no token-level predictions to distil; "
                                f"distillation trains clm (decoders) and mlm (encoders) students")
        meta = {"distill": config_io.to_dict(cfg.distill)}
        if cfg.distill.teacher_cache:
            cache = TeacherCache(cfg.distill.teacher_cache, cache_identity(cfg, read_manifest(cfg.train.data)), device)
            needed = required_epochs(cfg, objective, int(os.environ.get("WORLD_SIZE", "1")))
            if cache.meta["epochs"] < needed:
                raise SlmforgeError(f"distill.teacher_cache: {cfg.distill.teacher_cache} covers {cache.meta['epochs']} "
                                    f"epoch(s) of the data, this run reaches {needed}; build it again for this "
                                    f"train.max_steps (and --processes)")
            describe_cache(Path(cfg.distill.teacher_cache))
            return Distillation(objective, None, cfg.distill, cache, training=training), meta
        teacher = _teacher(cfg, student_family, tokenizer, device)
        if cfg.train.seq_len > teacher.model.cfg.max_seq_len:
            raise SlmforgeError(f"train.seq_len: {cfg.train.seq_len} exceeds the teacher's context "
                                f"({teacher.model.cfg.max_seq_len} tokens); the teacher reads what the student reads")
        meta["distill"].update({"teacher_parameters": sum(p.numel() for p in teacher.model.parameters()),
                                "teacher_family": teacher.model.cfg.family})
        return Distillation(objective, teacher, cfg.distill, projection=_projection(cfg, teacher, device),
                            training=training), meta

    run_dir = pretrain(cfg, extend_objective=with_teacher)
    if os.environ.get("RANK", "0") == "0":  # one process compares (after the process group is gone)
        from slmforge.distill.compare import compare_with_teacher
        from slmforge.runtime import resolve_device

        report = compare_with_teacher(run_dir, cfg, resolve_device(cfg.train.device))
        say(f"teacher {human(report['teacher']['parameters'])} parameters, student "
            f"{human(report['student']['parameters'])} ({report['compression']:.1f}x smaller); "
            f"side by side in {run_dir / 'distill_report.json'}")
    return run_dir


def _teacher(cfg: DistillRunConfig, student_family, tokenizer, device):
    teacher = load_teacher(cfg.distill.teacher, device, cfg.distill.teacher_dtype, tokenizer)
    teacher_family = family(teacher.model.cfg)
    if teacher_family.kind != student_family.kind:
        raise SlmforgeError(f"distill.teacher: a {teacher_family.name} {teacher_family.kind} cannot teach a "
                            f"{student_family.name} {student_family.kind} (both must predict the same positions)")
    size = sum(p.numel() for p in teacher.model.parameters())
    say(f"teacher {cfg.distill.teacher}: {teacher_family.name}, {human(size)} parameters, "
        f"{next(teacher.model.parameters()).dtype}; {cfg.distill.divergence}, alpha {cfg.distill.alpha:g}, "
        f"T {cfg.distill.temperature:g}")
    return teacher


def build_teacher_cache(cfg: DistillRunConfig, out: str, processes: int = 1) -> Path:
    """`slmforge distill --build-cache DIR`: the teacher's top-k logits for every sample the run will
    train on (with `processes` processes), in one pass, without training."""
    from slmforge.data.loader import WindowLoader
    from slmforge.data.shards import ShardSet, manifest_tokenizer_dir
    from slmforge.objectives import DEFAULT_FOR_KIND, ObjectiveConfig, build_objective
    from slmforge.runtime import resolve_device
    from slmforge.tokenizer import load_tokenizer
    from slmforge.train.run import resolve_steps

    loop = cfg.train
    shards = ShardSet(loop.data, loop.train_split)
    tokenizer = load_tokenizer(manifest_tokenizer_dir(Path(loop.data), shards.manifest))
    student = family(cfg.model)
    if cfg.objective is None:
        cfg.objective = config_io.parse(ObjectiveConfig, {"kind": DEFAULT_FOR_KIND[student.kind]}, "objective")
    objective = build_objective(cfg.objective, student.kind, student.name, tokenizer, where=f"{loop.data}")
    window = objective.window_tokens(loop.seq_len)
    loader = WindowLoader(shards, loop.seq_len, loop.batch_size * processes, seed=loop.seed, window=window)
    resolve_steps(cfg, loader.batches_per_epoch)
    epochs = required_epochs(cfg, objective, processes)
    device = resolve_device(loop.device)
    teacher = _teacher(cfg, student, tokenizer, device)
    say(f"caching the teacher's top-{cfg.distill.top_k} logits for {epochs} epoch(s) of {loader.num_windows:,} "
        f"windows")
    folder = build_cache(Path(out), loader, objective, teacher, cfg.distill.top_k, epochs, loop.seed,
                         cache_identity(cfg, shards.manifest), device)
    return describe_cache(folder)


def _projection(cfg: DistillRunConfig, teacher, device):
    """A linear map from the student's feature width to the teacher's, for hidden-state matching when
    the widths differ (seeded: the same start on every rank and every run)."""
    if not cfg.distill.hidden_weight:
        return None
    student_width, teacher_width = cfg.model.hidden_size, teacher.model.cfg.hidden_size
    if student_width == teacher_width:
        return None
    import torch

    projection = torch.nn.Linear(student_width, teacher_width, bias=False)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(teacher_width, student_width, generator=generator) / student_width ** 0.5)
    say(f"hidden states matched through a learned {student_width} -> {teacher_width} projection")
    return projection.to(device)
