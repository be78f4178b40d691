"""Distillation step speed: a student trained with the online teacher vs from the teacher's cached
top-k logits (`slmforge distill --build-cache`), in one run.

    python -m benchmarks.bench_distill_cache                # small encoder shapes on CPU, ~1 min on 2 cores
    python -m benchmarks.bench_distill_cache --teacher-preset xlmr-base --student-preset modernbert-hindi-33m \\
        --vocab 250002 --device cuda --seq-len 512 --batch-size 32

Both sides run the same training step (masked-LM collate, student forward, hard loss + forward KL at
T = 2, backward, AdamW) on the same batches; the online side also runs the teacher's forward pass,
the cached side reads the teacher's top-k logits of those samples from the cache instead. Sides
alternate round after round (median of the rounds; CPU time beside wall time).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleave, timing_note
from slmforge.distill.cache import TeacherCache, build_cache
from slmforge.distill.config import DistillConfig
from slmforge.distill.objective import Distillation
from slmforge.distill.teacher import Teacher
from slmforge.models import build_model, config_from_dict
from slmforge.objectives.mlm import MaskedLM, MlmConfig


class MemoryWindows:
    """The loader interface build_cache reads: fixed random windows."""

    def __init__(self, count: int, length: int, vocab: int):
        self.num_windows = count
        self.rows = np.random.default_rng(0).integers(5, vocab, size=(count, length))

    def window(self, index: int) -> np.ndarray:
        return self.rows[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-preset", default="bert-tiny")
    parser.add_argument("--student-preset", default="bert-tiny")
    parser.add_argument("--teacher-layers", type=int, default=6, help="(tiny presets) teacher depth")
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    teacher_overrides = {"preset": args.teacher_preset, "vocab_size": args.vocab}
    if args.teacher_preset.endswith("tiny"):
        teacher_overrides.update(num_layers=args.teacher_layers, hidden_size=args.teacher_hidden,
                                 intermediate_size=4 * args.teacher_hidden, num_heads=4)
    teacher_model = build_model(config_from_dict(teacher_overrides), device, seed=1).eval().requires_grad_(False)
    student = build_model(config_from_dict({"preset": args.student_preset, "vocab_size": args.vocab}), device, seed=0)
    objective = MaskedLM(MlmConfig(), mask_id=4, vocab_size=args.vocab, special_ids={0, 1, 2, 3, 4})
    teacher = Teacher(teacher_model, None, "bench", torch.arange(args.vocab, device=device), True)
    windows = MemoryWindows(args.batch_size * (args.rounds + 2) * args.steps, args.seq_len, args.vocab)
    cfg = DistillConfig(teacher="bench", alpha=0.5, temperature=2.0, top_k=args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        build_cache(Path(tmp) / "cache", windows, objective, teacher, args.top_k, 1, 0, {}, device)
        sides = {"online teacher": Distillation(objective, teacher, cfg),
                 "teacher cache": Distillation(objective, None, cfg, TeacherCache(Path(tmp) / "cache", {}, device))}
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        position = {name: 0 for name in sides}

        def step(name: str):
            def run():
                for _ in range(args.steps):
                    first = position[name] % (windows.num_windows - args.batch_size)
                    ids = np.arange(first, first + args.batch_size)
                    raw = {"tokens": torch.from_numpy(windows.rows[ids]), "sample_ids": torch.from_numpy(ids)}
                    batch = {k: v.to(device) for k, v in sides[name].collate(raw, 0).items()}
                    loss, _ = sides[name].loss(student, batch)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    position[name] += args.batch_size
            return run

        timings = interleave({name: step(name) for name in sides}, args.rounds, device)
    tokens = args.batch_size * args.seq_len * args.steps
    t_params = sum(p.numel() for p in teacher_model.parameters())
    s_params = sum(p.numel() for p in student.parameters())
    print(f"teacher {t_params / 1e6:.1f}M, student {s_params / 1e6:.1f}M parameters, vocab {args.vocab:,}, "
          f"batch {args.batch_size} x {args.seq_len}, top-{args.top_k}, {args.device}, torch threads "
          f"{torch.get_num_threads()}")
    for name, t in timings.items():
        print(f"{name:<16}{tokens / t.median_wall:>10.0f} tokens/s wall{t.median_cpu / args.steps:>9.3f} cpu s/step")
    online, cached = timings["online teacher"], timings["teacher cache"]
    print(f"cache / online: {online.median_wall / cached.median_wall:.2f}x the tokens/s "
          f"({online.median_cpu / cached.median_cpu:.2f}x by CPU time)")
    print("rounds: " + timing_note(timings, per=args.steps, unit="s/step"))


if __name__ == "__main__":
    main()
