"""Decoding speed with the KV cache against recomputing the whole context at every step (seed 002's
measurement). Both paths produce the same tokens (checked here); the ratio is the speed-up.

    python benchmarks/bench_generate_kv_cache.py [--preset llama-tiny] [--new 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from slmforge.inference.generate import SamplingConfig, generate_ids
from slmforge.models import DecoderConfig, build_model


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="tokens to generate")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = DecoderConfig.from_name(args.preset, max_seq_len=max(args.prompt + args.new, 64))
    model = build_model(cfg, device=device, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=0, stop_at_eos=False)
    generate_ids(model, prompt[:, :4], SamplingConfig(max_new_tokens=4, temperature=0))  # warm-up

    cached, t_cached = timed(lambda: generate_ids(model, prompt, sampling, use_cache=True), device)
    full, t_full = timed(lambda: generate_ids(model, prompt, sampling, use_cache=False), device)
    same = torch.equal(cached, full)
    tokens = args.batch * args.new
    print(f"model {args.preset} ({cfg.num_parameters() / 1e6:.1f}M params) on {device}, prompt {args.prompt}, "
          f"{args.new} new tokens x batch {args.batch}")
    print(f"baseline, no cache (recompute context each step): {tokens / t_full:10.1f} tok/s")
    print(f"slmforge KV cache:                                {tokens / t_cached:10.1f} tok/s")
    print(f"speed-up: {t_full / t_cached:.2f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
