"""FlexAttention block masks (train.attention = "flex") against SDPA with boolean masks (the default):
a decoder with sliding-window layers, once on plain windows and once on packed documents, same weights
and batch on both sides.

    python -m benchmarks.bench_flex_attention                      # CPU, small: forward passes only
    python -m benchmarks.bench_flex_attention --device cuda --preset gemma3-270m --seq-len 4096 \\
        --batch 4 --window 512 --dtype bfloat16                     # a GPU: training steps

On CUDA each timed step is forward + backward of the causal-LM loss. On CPU torch 2.13 has no
FlexAttention backward, so each step is a forward pass (loss, no gradient), which is what CPU
numbers measure. flex_attention and create_block_mask are compiled (their first call, timed apart
as compile time); the baseline builds its boolean masks (T x T, or B x T x T for documents) each
step as training does. Before timing, both sides' losses must agree within 1e-4 (float32) or 2e-2
(bfloat16), or the case is refused.

Timing: the sides alternate round after round (and which one goes first), each round times --steps
steps per side; reported are the medians over rounds of tokens/s (wall clock) and CPU seconds per
step (process time, every thread; on CUDA the host's share), the ratio flex / sdpa of tokens/s
(above 1 = flex faster), the load average before and after, and the peak memory a step adds.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch

from benchmarks.common import interleave, peak_memory_mib, synchronize, timing_note
from slmforge.models import DecoderConfig, build_model, flex
from slmforge.objectives.clm import CausalLM


def packed_documents(batch: int, length: int, mean: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) document ids: documents of random lengths (1 .. 2 x mean) laid end to end."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, 2 * mean + 1, (length,), generator=generator)
        rows.append(torch.repeat_interleave(torch.arange(length), lengths)[:length])
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs both cases and returns the ratio flex / sdpa of tokens/s per case."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma3-tiny")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", type=int, default=128, help="sliding window (tokens)")
    parser.add_argument("--document-length", type=int, default=200, help="mean length of a packed document")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="default bfloat16 autocast on CUDA, float32 on CPU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    training = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if training else "float32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())
    cfg = DecoderConfig.from_name(args.preset, max_seq_len=args.seq_len, sliding_window=args.window)
    model = build_model(cfg, device=device, seed=0).train(training)
    objective = CausalLM()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    documents = packed_documents(args.batch, args.seq_len + 1, args.document_length, generator)
    cases = {"sliding windows": {"tokens": tokens},
             f"sliding windows + packed documents (mean {args.document_length})": {"tokens": tokens,
                                                                                  "document_ids": documents}}

    def step(batch, kernel: str):
        model.set_attention(kernel)
        with autocast, (nullcontext() if training else torch.no_grad()):
            loss, _ = objective.loss(model, batch)
        if training:
            model.zero_grad(set_to_none=True)
            loss.backward()
        return loss.detach().float()

    sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    print(f"{args.preset}: {cfg.num_layers} layers ({sliding} sliding, window {args.window}), heads "
          f"{cfg.num_heads}:{cfg.num_kv_heads}, head_dim {cfg.head_dim}; batch {args.batch} x {args.seq_len} "
          f"tokens; {device} {dtype}; {'forward + backward' if training else 'forward only (no CPU backward)'}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    ratios = {}
    for name, raw in cases.items():
        batch = {k: v.to(device) for k, v in objective.collate(raw).items()}
        load_before = os.getloadavg()[0]
        synchronize(device)
        start = time.perf_counter()
        flex_loss = step(batch, "flex")  # compiles flex_attention and create_block_mask for this case
        synchronize(device)
        compile_s = time.perf_counter() - start
        sdpa_loss = step(batch, "sdpa")
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        if not torch.allclose(flex_loss, sdpa_loss, atol=tolerance, rtol=tolerance):
            raise SystemExit(f"{name}: losses differ (flex {flex_loss.item():.6f}, sdpa {sdpa_loss.item():.6f}); "
                             f"refusing to time different computations")
        kernels = ("sdpa", "flex")
        sides = {kernel: (lambda kernel=kernel: [step(batch, kernel) for _ in range(args.steps)]) for kernel in kernels}
        timings = interleave(sides, args.rounds, device)
        memory = {kernel: peak_memory_mib(lambda kernel=kernel: step(batch, kernel), device) for kernel in kernels}
        rate = {kernel: args.batch * args.seq_len * args.steps / timings[kernel].median_wall for kernel in kernels}
        print(f"\n{name}: loss {sdpa_loss.item():.5f} on both sides (|diff| "
              f"{abs(flex_loss - sdpa_loss).item():.1e}); flex's first step with compiling {compile_s:.1f} s")
        print(f"  baseline SDPA + boolean mask: {rate['sdpa']:9.0f} tok/s, "
              f"{timings['sdpa'].median_cpu / args.steps:.3f} s cpu/step, {memory['sdpa']:.0f} MiB peak added")
        print(f"  flex block masks (compiled):  {rate['flex']:9.0f} tok/s, "
              f"{timings['flex'].median_cpu / args.steps:.3f} s cpu/step, {memory['flex']:.0f} MiB peak added")
        print(f"  ratio flex / sdpa: {rate['flex'] / rate['sdpa']:.2f}x tokens/s, "
              f"{memory['flex'] / max(memory['sdpa'], 1e-9):.2f}x memory; "
              f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
        print(f"  rounds: {timing_note(timings, per=args.steps, unit='s/step')}")
        ratios[name] = rate["flex"] / rate["sdpa"]
    print(f"\nflex kernel: {flex.attention_kernel.state}, block masks: {flex.mask_builder.state} "
          f"(failed = fell back to the plain path, see the warning above)")
    return ratios


if __name__ == "__main__":
    main()
