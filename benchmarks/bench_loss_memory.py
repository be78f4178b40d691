"""Peak memory and time of one forward+backward of the output layer + cross-entropy, for slmforge's
chunked linear cross-entropy against the plain baseline (full logits, then F.cross_entropy), at
Gemma 3's 262,144-token vocabulary. Each variant runs in its own process so peak RSS is its own.

    python benchmarks/bench_loss_memory.py [--tokens 2048] [--vocab 262144] [--hidden 640]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def run_variant(name: str, tokens: int, vocab: int, hidden: int, device: str) -> dict:
    from slmforge.objectives.losses import linear_cross_entropy

    torch.manual_seed(0)
    dev = torch.device(device)
    h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if name == "baseline":
        loss = F.cross_entropy(h @ w.t(), t)
    else:
        loss = linear_cross_entropy(h, w, t)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    return {"seconds": time.perf_counter() - start, "peak_mib": peak, "loss": float(loss),
            "grad_norm": float(h.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.hidden, args.device)))
        return
    results = {}
    for name in ("baseline", "slmforge"):
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--device", args.device],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout)
    b, s = results["baseline"], results["slmforge"]
    print(f"{args.tokens} tokens x vocab {args.vocab} x hidden {args.hidden} on {args.device} "
          f"(peak = {'CUDA allocated' if args.device.startswith('cuda') else 'added RSS'})")
    print(f"baseline (full logits + F.cross_entropy): {b['peak_mib']:8.0f} MiB  {b['seconds']:6.2f} s")
    print(f"slmforge chunked linear cross-entropy:    {s['peak_mib']:8.0f} MiB  {s['seconds']:6.2f} s")
    print(f"memory ratio baseline/slmforge: {b['peak_mib'] / max(s['peak_mib'], 1):.1f}x   "
          f"time ratio: {b['seconds'] / s['seconds']:.2f}x   "
          f"same loss: {abs(b['loss'] - s['loss']) < 1e-4 * abs(b['loss'])}   "
          f"same grad norm: {abs(b['grad_norm'] - s['grad_norm']) < 1e-3 * b['grad_norm']}")


if __name__ == "__main__":
    main()
