"""The output layer + loss alone at a large vocabulary: slmforge's chunked linear cross-entropy against
full logits + `F.cross_entropy` (what transformers does: logits, `.float()`, cross-entropy), forward and
backward, time and peak memory. Loss and gradients are compared before timing. On CUDA with
liger-kernel installed, Liger's fused linear cross-entropy (`train.loss_kernel = "liger"`) is a third
side, compared with both."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.common import Row, interleave, peak_memory_mib, timing_note
from benchmarks.shapes import ShapeSet
from slmforge.models.heads import OutputProjection
from slmforge.objectives.losses import HeadLoss, default_chunk_rows, linear_cross_entropy


def liger_available(device: torch.device) -> bool:
    try:
        HeadLoss("liger").check(device)
    except Exception:
        return False
    return True


def run(shapes: ShapeSet, device: torch.device, log=print) -> list[Row]:
    rows = []
    for case in shapes.loss:
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(case.tokens, case.hidden, generator=generator).to(device).requires_grad_()
        weight = (torch.randn(case.vocab, case.hidden, generator=generator) * 0.02).to(device).requires_grad_()
        targets = torch.randint(0, case.vocab, (case.tokens,), generator=generator).to(device)
        for dtype_name in case.dtypes:
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype_name == "bfloat16"
                        else nullcontext())
            results = {}

            def step(name):
                def fn():
                    hidden.grad = weight.grad = None
                    with autocast:
                        if name == "chunked":
                            loss = linear_cross_entropy(hidden, weight, targets)
                        elif name == "liger":
                            loss = HeadLoss("liger")(OutputProjection(hidden, weight), targets)[0]
                        else:
                            loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
                    loss.backward()
                    results[name] = (loss.detach(), hidden.grad, weight.grad)
                return fn

            names = ["chunked", "plain"] + (["liger"] if liger_available(device) else [])
            sides = {name: step(name) for name in names}
            for fn in sides.values():
                fn()
            tol = 1e-4 if dtype_name == "float32" else 2e-2
            lb, hb, wb = results["plain"]
            for name in names:
                la, ha, wa = results[name]
                agree = (abs(float(la) - float(lb)) <= tol * abs(float(lb))
                         and float((ha - hb).abs().max()) <= tol * 10 * float(hb.abs().max())
                         and float((wa - wb).abs().max()) <= tol * 10 * float(wb.abs().max()))
                if not agree:
                    raise SystemExit(f"loss {dtype_name}: {name} and plain disagree (loss {float(la)} vs {float(lb)})")
            del la, ha, wa, lb, hb, wb
            results.clear()
            timings = interleave(sides, shapes.rounds, device, warmup=0)
            results.clear()
            memory = {name: peak_memory_mib(fn, device) for name, fn in sides.items()}
            rows_per_chunk = default_chunk_rows(case.vocab, device)
            label = (f"{case.tokens:,} tokens x vocab {case.vocab:,} x hidden {case.hidden}, {dtype_name}, "
                     f"forward + backward")
            notes = f"chunks of {rows_per_chunk} rows; same loss and gradients; {timing_note(timings)}"
            rows += [
                Row("loss", label, "seconds", timings["chunked"].median_wall, timings["plain"].median_wall,
                    "logits + F.cross_entropy", higher_is_better=False, notes=notes,
                    extra={"cpu_s": {n: t.median_cpu for n, t in timings.items()}}),
                Row("loss", label, "peak MiB", memory["chunked"], memory["plain"], "logits + F.cross_entropy",
                    higher_is_better=False),
            ]
            if "liger" in sides:  # slmforge's chunked loss against Liger's fused Triton kernel
                rows += [
                    Row("loss", label, "seconds", timings["chunked"].median_wall, timings["liger"].median_wall,
                        "Liger fused linear CE", higher_is_better=False, notes=notes),
                    Row("loss", label, "peak MiB", memory["chunked"], memory["liger"], "Liger fused linear CE",
                        higher_is_better=False),
                ]
            log(f"  loss {label}: chunked {timings['chunked'].median_wall:.3g} s, plain "
                f"{timings['plain'].median_wall:.3g} s; memory {memory['chunked']:.1f} vs {memory['plain']:.1f} MiB")
    return rows
