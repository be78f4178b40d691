"""Masked-LM training throughput and peak memory of slmforge's encoders against transformers'
BertForMaskedLM and ModernBertForMaskedLM: same shape, batch, precision and weights, in one run.

    python benchmarks/bench_mlm_train.py                      # both families, small shapes, ~30-60 s on 2 cores
    python benchmarks/bench_mlm_train.py --family modernbert --rounds 7 --steps 4 --threads 2
    python benchmarks/bench_mlm_train.py --preset bert-base --batch-size 32 --seq-len 512 \\
        --device cuda --dtype bfloat16

Each step is forward + backward + torch.optim.AdamW step (same lr and weight decay on both sides) on
the same masked batches, made by slmforge's MLM collate (15% chosen, 80/10/10). slmforge's loss is
`MaskedLM.loss`: the head runs on the masked positions only, then a chunked fused cross-entropy.
transformers gets `labels=targets` (-100 where not masked) and runs its head on every position,
except ModernBERT with --hf-sparse-prediction (its `sparse_prediction` option). Both use SDPA.

The transformers model is loaded with slmforge's weights through the HF adapter (`config_to_hf`,
`state_dict_to_hf`), and the run stops unless both losses agree within 1e-4 in float32 (eval mode, so
no dropout) on the first batch, and again on the next batch after one AdamW step (same gradients too).
Whatever --dtype says, that check runs in float32; the timed steps then run in training mode.

Timing: the two sides alternate, round after round (which one goes first alternates as well), so a
burst of load from elsewhere hits both; each round times --steps steps per side. Reported: the median
over rounds of tokens/s (wall clock) and of CPU seconds per step (process time, all threads; on CUDA
only the host's share). Memory: each side runs alone in a fresh process and reports the peak memory
its first two training steps add on top of the built model and optimizer (grads, AdamW state,
activations, temporaries): on CPU peak RSS (VmHWM, reset before the steps) minus RSS before, with
glibc's mmap threshold fixed so that freed tensors leave RSS (allocator slack still counts); on CUDA
torch.cuda.max_memory_allocated minus memory_allocated before (PyTorch's cache not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from slmforge.models import EncoderConfig, build_model
from slmforge.models.hf import config_to_hf, state_dict_to_hf
from slmforge.models.presets import PRESETS, family_of
from slmforge.objectives.mlm import MaskedLM, MlmConfig

HF_CLASSES = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}
# Without --preset: a small model of each family that trains a step in well under a second on 2 CPU
# cores. The family's own preset supplies the rest (dropout 0.1 for BERT; ModernBERT's 128-token
# local window, global every 3rd layer, GeGLU 1.5x as in modernbert-base's 1152 / 768).
DEFAULT_PRESETS = {"bert": "bert-10m", "modernbert": "modernbert-hindi-33m"}
SMALL_SHAPE = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4)
SMALL_INTERMEDIATE = {"bert": 1024, "modernbert": 384}
# Token ids the collate never chooses or draws: pad, cls, sep, mask.
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3
TOLERANCE = 1e-4


@dataclass
class Contender:
    name: str
    model: nn.Module
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer


# ---------------------------------------------------------------- models and batches


def model_config(family: str, args: argparse.Namespace) -> EncoderConfig:
    if args.preset is not None:
        cfg = EncoderConfig.from_name(args.preset)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    else:
        cfg = EncoderConfig.from_name(DEFAULT_PRESETS[family], **SMALL_SHAPE, max_seq_len=args.seq_len,
                                      intermediate_size=SMALL_INTERMEDIATE[family])
    return cfg if args.dropout is None else dataclasses.replace(cfg, dropout=args.dropout)


def build_ours(cfg: EncoderConfig, device: torch.device) -> nn.Module:
    return build_model(cfg, device=device, seed=0).train()


def build_theirs(cfg: EncoderConfig, ours: nn.Module, device: torch.device, sparse_prediction: bool) -> nn.Module:
    """transformers' model of `cfg`, holding exactly our weights (through the adapter's name mapping)."""
    import transformers

    hf = config_to_hf(cfg)
    if cfg.family == "modernbert":
        hf["sparse_prediction"] = sparse_prediction
    config = transformers.AutoConfig.for_model(**hf)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    if type(model).__name__ != HF_CLASSES[cfg.family]:
        raise SystemExit(f"expected {HF_CLASSES[cfg.family]}, transformers built {type(model).__name__}")
    result = model.load_state_dict(state_dict_to_hf(cfg, ours.state_dict()), strict=False)
    # What the adapter leaves out is tied to something it stores (the decoder to the embeddings,
    # BERT's decoder bias to cls.predictions.bias); check the tie instead of trusting it.
    if result.unexpected_keys or model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise SystemExit(f"weights did not load as expected: {result}")
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, model))
    if n_ours != n_theirs:
        raise SystemExit(f"parameter counts differ: slmforge {n_ours:,}, transformers {n_theirs:,}")
    return model.to(device).train()


def make_batches(cfg: EncoderConfig, objective: MaskedLM, count: int, batch_size: int, seq_len: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`count` masked batches of full-length random rows ([CLS] text [SEP], no padding), masked by the
    objective's own collate (seed 0, sample ids numbered through the batches)."""
    batches = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tokens = torch.randint(MASK_ID + 1, cfg.vocab_size, (batch_size, seq_len), generator=generator)
        tokens[:, 0], tokens[:, -1] = CLS_ID, SEP_ID
        ids = torch.arange(index * batch_size, (index + 1) * batch_size)
        batch = objective.collate({"tokens": tokens, "sample_ids": ids}, 0)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def contenders(family: str, args: argparse.Namespace, device: torch.device
               ) -> tuple[EncoderConfig, MaskedLM, list[Contender]]:
    """slmforge's model and transformers' with the same weights, each with its loss and AdamW."""
    cfg = model_config(family, args)
    objective = MaskedLM(MlmConfig(), mask_id=MASK_ID, vocab_size=cfg.vocab_size,
                         special_ids={PAD_ID, CLS_ID, SEP_ID, MASK_ID})
    ours = build_ours(cfg, device)
    theirs = build_theirs(cfg, ours, device, args.hf_sparse_prediction)
    return cfg, objective, [
        Contender("slmforge", ours, lambda batch: objective.loss(ours, batch)[0],
                  torch.optim.AdamW(ours.parameters(), lr=args.lr, weight_decay=0.01)),
        Contender(HF_CLASSES[family], theirs,
                  lambda batch: theirs(input_ids=batch["input_ids"], labels=batch["targets"]).loss,
                  torch.optim.AdamW(theirs.parameters(), lr=args.lr, weight_decay=0.01)),
    ]


def train_step(side: Contender, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    with autocast:
        loss = side.loss(batch)
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def autocast_for(args: argparse.Namespace):
    return torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- checks, timing, memory


def check_same_losses(sides: list[Contender], batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """float32, eval mode (no dropout): the first batch's loss, one AdamW step, then the second batch's loss (which
    agrees only if the gradients and the update did). Returns the two slmforge losses."""
    for side in sides:
        side.model.eval()
    first = [float(train_step(side, batches[0], nullcontext())) for side in sides]
    with torch.no_grad():
        second = [float(side.loss(batches[1])) for side in sides]
    for side in sides:
        side.model.train()
    for what, losses in (("first batch", first), ("after one AdamW step", second)):
        if abs(losses[0] - losses[1]) > TOLERANCE:
            raise SystemExit(f"losses differ ({what}): {sides[0].name} {losses[0]:.6f}, "
                             f"{sides[1].name} {losses[1]:.6f}; not the same model, refusing to time it")
    return first[0], second[0]


def time_rounds(sides: list[Contender], batches: list[dict[str, torch.Tensor]], args: argparse.Namespace,
                device: torch.device) -> dict[str, list[tuple[float, float]]]:
    """{name: [(wall seconds, cpu seconds) per round]} for --steps steps per round and side."""
    autocast = autocast_for(args)
    for side in sides:  # warm-up in training mode and precision (first-call allocations, kernels)
        train_step(side, batches[0], autocast)
    results: dict[str, list[tuple[float, float]]] = {side.name: [] for side in sides}
    for round_index in range(args.rounds):
        order = sides if round_index % 2 == 0 else sides[::-1]
        for side in order:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for step in range(args.steps):
                train_step(side, batches[step % len(batches)], autocast)
            synchronize(device)
            results[side.name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return results


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: measure what the first two steps of one side add. Both sides are
    built and the other one dropped, so each side's process has the same allocation history."""
    device = torch.device(args.device)
    family, name = args.memory_child.split(":")
    cfg, objective, sides = contenders(family, args, device)
    side = next(side for side in sides if side.name == name)
    del sides
    batches = make_batches(cfg, objective, 2, args.batch_size, args.seq_len, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS") * 1024
    for batch in batches:
        train_step(side, batch, autocast_for(args))
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_kib("VmHWM") * 1024
    return {"added_mib": (peak - base) / 2**20}


def measure_memory(family: str, name: str, argv: list[str]) -> float:
    # A fixed glibc mmap threshold (the default one grows up to 32 MiB as large blocks are freed):
    # freed tensors go back to the OS, so RSS follows live memory rather than the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-child", f"{family}:{name}"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"memory measurement of {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["added_mib"]


# ---------------------------------------------------------------- report


def format_rate(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"


def bench_family(family: str, args: argparse.Namespace, argv: list[str], device: torch.device) -> str:
    cfg, objective, sides = contenders(family, args, device)
    batches = make_batches(cfg, objective, max(args.steps, 2), args.batch_size, args.seq_len, device)
    masked = sum(int((b["targets"] != -100).sum()) for b in batches) / len(batches)
    params = sum(p.numel() for p in sides[0].model.parameters())
    ours, theirs = sides[0].name, sides[1].name
    attn = sides[1].model.config._attn_implementation
    sparse = f", sparse_prediction={args.hf_sparse_prediction}" if family == "modernbert" else ""
    print(f"\n== {family}: {args.preset or DEFAULT_PRESETS[family] + ' (small shape)'}, {params / 1e6:.2f}M params, "
          f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, dropout {cfg.dropout}")
    print(f"   {theirs}: attn_implementation={attn}{sparse}; head on "
          f"{'masked positions only' if family == 'modernbert' and args.hf_sparse_prediction else 'all positions'} "
          f"(slmforge: masked only, ~{masked:.0f} of {args.batch_size * args.seq_len} tokens per batch)")
    loss_first, loss_second = check_same_losses(sides, batches)
    print(f"   same loss (float32, dropout off, tol {TOLERANCE:g}): first batch {loss_first:.5f}, "
          f"after one AdamW step {loss_second:.5f}: ok")

    load_before = os.getloadavg()[0]
    results = time_rounds(sides, batches, args, device)
    # Other processes on the cores make OpenMP threads wait for each other; say how busy they were.
    print(f"   timing: 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores visible)")
    tokens = args.steps * args.batch_size * args.seq_len
    rates, cpu_per_step = {}, {}
    for name, rounds in results.items():
        rates[name] = statistics.median(tokens / wall for wall, _ in rounds)
        cpu_per_step[name] = statistics.median(cpu for _, cpu in rounds) / args.steps
        wall_per_step = statistics.median(wall for wall, _ in rounds) / args.steps
        spread = ", ".join(f"{format_rate(tokens / wall)}" for wall, _ in rounds)
        print(f"   {name:22s} median {format_rate(rates[name]):>7s} tok/s  {wall_per_step * 1000:7.1f} ms wall/step  "
              f"{cpu_per_step[name] * 1000:7.1f} ms cpu/step   rounds: {spread}")

    memory = {side.name: measure_memory(family, side.name, argv) for side in sides}
    fixed = 3 * params * 4 / 2**20  # fp32 grads + AdamW exp_avg + exp_avg_sq, the same on both sides
    what = "CUDA allocated" if device.type == "cuda" else "RSS"
    print(f"   peak {what} added by 2 steps (fresh process each; includes {fixed:.0f} MiB of grads + AdamW state): "
          + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in memory.items())
          + f"; ratio {memory[ours] / max(memory[theirs], 1e-9):.2f}x")
    ratio = rates[ours] / rates[theirs]
    return (f"{family}: slmforge {format_rate(rates[ours])} tok/s vs {theirs} {format_rate(rates[theirs])} tok/s: "
            f"{ratio:.2f}x, cpu time/step {cpu_per_step[ours] / cpu_per_step[theirs]:.2f}x, peak memory "
            f"{memory[ours]:.0f} vs {memory[theirs]:.0f} MiB ({device.type}, {args.dtype}, "
            f"{torch.get_num_threads()} threads, batch {args.batch_size} x seq {args.seq_len}, {attn}{sparse}, "
            f"median of {args.rounds} rounds x {args.steps} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("bert", "modernbert"), action="append",
                        help="family to compare (repeatable; default both, or the preset's family)")
    parser.add_argument("--preset", help="slmforge encoder preset (e.g. bert-base, modernbert-base); default: "
                        "a small shape per family (hidden 256, 4 layers, 4 heads, vocab 8192)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16 = bf16 autocast on both sides, fp32 weights and AdamW state")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round and side")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, help="override the preset's dropout (the loss check "
                        "runs in eval mode either way)")
    parser.add_argument("--hf-sparse-prediction", action="store_true",
                        help="ModernBertForMaskedLM: run its head on masked positions only, like slmforge")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    families = args.family or ["bert", "modernbert"]
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise SystemExit(f"--preset {args.preset}: unknown; known: {', '.join(sorted(PRESETS))}")
        preset_family = family_of({"preset": args.preset})
        if preset_family not in HF_CLASSES:
            raise SystemExit(f"--preset {args.preset}: family {preset_family} is not compared here "
                             f"({', '.join(HF_CLASSES)})")
        if args.family and args.family != [preset_family]:
            raise SystemExit(f"--preset {args.preset} is a {preset_family} model; --family says {args.family}")
        families = [preset_family]
    argv = sys.argv[1:]
    import transformers

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps per side, AdamW lr {args.lr}")
    summary = [bench_family(family, args, argv, device) for family in families]
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
