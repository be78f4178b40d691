"""One Muon step over a model's hidden matrices: slmforge's BatchedMuon (same-shape matrices orthogonalised
together) against torch.optim.Muon (one matrix at a time), sides interleaved, median of the rounds, CPU time
beside wall time. Both start from the same weights and gradients and end bit-for-bit equal on CPU (checked).

    python -m benchmarks.bench_muon_step [--presets gemma3-tiny,issue] [--rounds 7] [--steps 10] [--threads 1]
    [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleave, timing_note

# the ~10M Gemma 3 decoder of benchmarks/time_to_quality.py --shape issue
ISSUE = {"preset": "gemma3-tiny", "hidden_size": 256, "num_layers": 10, "num_heads": 4, "num_kv_heads": 1,
         "head_dim": 64, "intermediate_size": 1024, "query_pre_attn_scalar": 64.0}


def matrices(preset: str, device: torch.device) -> list[torch.nn.Parameter]:
    from slmforge import config
    from slmforge.models.registry import build_model
    from slmforge.train.config import PretrainConfig
    from slmforge.train.optim import parameter_groups

    model_table = ISSUE if preset == "issue" else {"preset": preset}
    cfg = config.from_dict(PretrainConfig, {"model": {**model_table, "vocab_size": 4096, "max_seq_len": 128},
                                            "train": {"seq_len": 128}})
    model = build_model(cfg.model, device=device, seed=0)
    return [p for _, p in parameter_groups(model, "muon")["muon"]]


def main(argv=None) -> int:
    from slmforge.train.muon import BatchedMuon

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_muon_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="gemma3-tiny,issue")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"of {args.steps} steps, median per step")
    for preset in args.presets.split(","):
        params = matrices(preset, device)
        generator = torch.Generator(device=device).manual_seed(0)
        for q in params:
            q.grad = torch.randn(q.shape, generator=generator, device=device) * 1e-3
        twins = [torch.nn.Parameter(q.detach().clone()) for q in params]
        for q, t in zip(params, twins):
            t.grad = q.grad.clone()
        theirs = torch.optim.Muon(params, lr=0.02, weight_decay=0.01)
        ours = BatchedMuon(twins, lr=0.02, weight_decay=0.01)

        def run(optimizer):
            return lambda: [optimizer.step() for _ in range(args.steps)]

        timings = interleave({"torch.optim.Muon": run(theirs), "BatchedMuon": run(ours)}, args.rounds, device)
        equal = all(torch.equal(a, b) for a, b in zip(params, twins))
        shapes = len({tuple(q.shape) for q in params})
        ratio_cpu = timings["BatchedMuon"].median_cpu / timings["torch.optim.Muon"].median_cpu
        ratio_wall = timings["BatchedMuon"].median_wall / timings["torch.optim.Muon"].median_wall
        print(f"{preset}: {len(params)} matrices of {shapes} shapes, "
              f"{sum(q.numel() for q in params) / 1e6:.2f}M parameters; weights equal after the runs: {equal}")
        print(f"  {timing_note(timings, per=args.steps / 1000, unit='ms')}")
        print(f"  BatchedMuon / torch.optim.Muon: {ratio_cpu:.2f}x CPU time, {ratio_wall:.2f}x wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
