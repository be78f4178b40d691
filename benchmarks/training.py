"""Training throughput, peak memory and MFU: slmforge's model + objective against transformers'
`*ForCausalLM` / `*ForMaskedLM` with its own loss (`labels=`), same weights, batch and precision.

Each step is forward + backward + AdamW (fused on CUDA, foreach on CPU, the same on both sides).
Before timing, both sides' losses on the first batch must agree within 1e-4 in float32 (eval mode),
or the case is refused: a ratio between two different models would mean nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.common import Row, interleave, matmul_rate, peak_memory_mib, timing_note
from benchmarks.models import build_pair, compile_blocks, describe
from benchmarks.shapes import ShapeSet, TrainingCase
from slmforge.objectives.clm import CausalLM
from slmforge.objectives.mlm import MaskedLM, MlmConfig

TOLERANCE = 1e-4
MLM_HEAD_NOTE = "; the vocabulary projection for masked tokens only"
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3  # the MLM collate never chooses or draws these


@dataclass
class Side:
    name: str
    model: nn.Module
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer


def make_batches(cfg, case: TrainingCase, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    batches = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        if case.objective == "clm":
            tokens = torch.randint(0, cfg.vocab_size, (case.batch, case.seq_len + 1), generator=generator)
            batch = CausalLM().collate({"tokens": tokens})
        else:
            objective = mlm_objective(cfg)
            tokens = torch.randint(MASK_ID + 1, cfg.vocab_size, (case.batch, case.seq_len), generator=generator)
            tokens[:, 0], tokens[:, -1] = CLS_ID, SEP_ID
            ids = torch.arange(index * case.batch, (index + 1) * case.batch)
            batch = objective.collate({"tokens": tokens, "sample_ids": ids}, 0)
        batches.append({k: v.contiguous().to(device) for k, v in batch.items()})
    return batches


def mlm_objective(cfg) -> MaskedLM:
    return MaskedLM(MlmConfig(), mask_id=MASK_ID, vocab_size=cfg.vocab_size,
                    special_ids={PAD_ID, CLS_ID, SEP_ID, MASK_ID})


def sides_for(case: TrainingCase, device: torch.device, compile_model: bool):
    cfg, ours, theirs = build_pair(case.model, device)
    if case.objective == "clm":
        objective = CausalLM()

        def their_loss(batch):
            # transformers' own loss (logits.float() then cross-entropy); shift_labels: our targets are
            # already the next tokens.
            return theirs(input_ids=batch["input_ids"], labels=batch["targets"],
                          shift_labels=batch["targets"]).loss
    else:
        objective = mlm_objective(cfg)

        def their_loss(batch):
            return theirs(input_ids=batch["input_ids"], labels=batch["targets"]).loss

    fused = device.type == "cuda"
    sides = [
        Side("slmforge", ours, lambda batch: objective.loss(ours, batch)[0],
             torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)),
        Side(type(theirs).__name__, theirs, their_loss,
             torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)),
    ]
    check_same_loss(sides, make_batches(cfg, case, 1, device)[0], case.name)
    if compile_model:
        for side in sides:
            compile_blocks(side.model)
    return cfg, sides


@torch.no_grad()
def check_same_loss(sides: list[Side], batch: dict[str, torch.Tensor], name: str) -> float:
    losses = []
    for side in sides:
        side.model.eval()
        losses.append(float(side.loss(batch)))
        side.model.train()
    if abs(losses[0] - losses[1]) > TOLERANCE:
        raise SystemExit(f"{name}: losses differ ({sides[0].name} {losses[0]:.6f}, {sides[1].name} "
                         f"{losses[1]:.6f}): not the same model, refusing to time it")
    return losses[0]


def model_flops_per_token(cfg, case: TrainingCase, batches: list[dict[str, torch.Tensor]]) -> float:
    """Training FLOPs the model needs per input token: 6N + attention (the config's flops_per_token). For
    masked LM only the masked positions need the vocabulary projection, so it counts for those only
    (transformers computes it everywhere; that is work the model does not need, not utilisation)."""
    flops = cfg.flops_per_token(case.seq_len)
    if case.objective != "mlm":
        return flops
    masked = sum(float((b["targets"] != -100).float().mean()) for b in batches) / len(batches)
    return flops - 6 * cfg.vocab_size * cfg.hidden_size * (1.0 - masked)


def train_step(side: Side, batch: dict[str, torch.Tensor], autocast) -> None:
    with autocast:
        loss = side.loss(batch)
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)


def run(shapes: ShapeSet, device: torch.device, compile_model: bool, log=print) -> list[Row]:
    dtype = torch.bfloat16 if shapes.dtype == "bfloat16" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    # MFU's denominator: the matmul rate of the training precision, measured here and now.
    peak = matmul_rate(device, dtype, shapes.matmul_size)
    log(f"training: measured {dtype} matmul rate {peak / 1e9:.1f} GFLOP/s ({shapes.matmul_size}^2)")
    rows = []
    for case in shapes.training:
        cfg, sides = sides_for(case, device, compile_model)
        batches = make_batches(cfg, case, shapes.steps, device)
        tokens = shapes.steps * case.batch * case.seq_len

        def steps_of(side):
            return lambda: [train_step(side, batch, autocast) for batch in batches]

        timings = interleave({side.name: steps_of(side) for side in sides}, shapes.rounds, device)
        memory = {side.name: peak_memory_mib(lambda s=side: train_step(s, batches[0], autocast), device)
                  for side in sides}
        ours, theirs = sides[0].name, sides[1].name
        rate = {name: tokens / t.median_wall for name, t in timings.items()}
        label = (f"{case.name}: B {case.batch} x T {case.seq_len}, {shapes.dtype}"
                 f"{', compiled blocks' if compile_model else ''}")
        setting = f"{describe(cfg)}; {timing_note(timings, shapes.steps, 's/step')}"
        flops = model_flops_per_token(cfg, case, batches)
        rows += [
            Row("training", label, "tokens/s", rate[ours], rate[theirs], theirs, notes=setting,
                extra={"cpu_s_per_step": {n: t.median_cpu / shapes.steps for n, t in timings.items()}}),
            Row("training", label, "peak MiB added by a step", memory[ours], memory[theirs], theirs,
                higher_is_better=False,
                notes="one step after warm-up (AdamW state exists): CUDA max allocated, or the CPU allocator's peak "
                      "from the profiler's memory events"),
            Row("training", label, "MFU %", 100 * flops * rate[ours] / peak, 100 * flops * rate[theirs] / peak, theirs,
                notes=f"{flops / 1e6:.1f} MFLOP/token (6N + attention"
                      f"{MLM_HEAD_NOTE if case.objective == 'mlm' else ''}) "
                      f"over the measured {dtype} matmul rate {peak / 1e9:.0f} GFLOP/s"),
        ]
        log(f"  {label}: slmforge {rate[ours]:,.0f} tok/s, {theirs} {rate[theirs]:,.0f} tok/s "
            f"({rate[ours] / rate[theirs]:.2f}x)")
    return rows
