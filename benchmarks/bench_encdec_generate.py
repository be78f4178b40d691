"""Encoder-decoder decoding speed: slmforge's cached decoding (self-attention KV cache + cross-attention
keys/values projected once) against (1) recomputing the whole target at every step, and (2)
transformers' `generate` on the same T5 weights (converted through `models/hf/t5.py`, as export does).

Every contender produces the same tokens (checked). Runs are interleaved (A B A B ...) so drift in a
shared machine's load hits both alike; each figure is the median of --repeats runs, wall time with
process CPU time beside it (CPU time > wall time = more than one core busy).

    python benchmarks/bench_encdec_generate.py [--preset t5-small] [--new 256] [--source 64]
        [--batch 1] [--beams 1] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slmforge.inference.seq2seq import Seq2SeqConfig, generate_seq2seq
from slmforge.models import EncDecConfig, build_model
from slmforge.models.hf.t5 import config_to_hf, state_dict_to_hf


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def race(contenders: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Median wall and CPU seconds of each contender over `repeats` interleaved rounds, and its output."""
    walls = {name: [] for name in contenders}
    cpus = {name: [] for name in contenders}
    outputs = {}
    names = list(contenders)
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]  # alternate who goes first
        for name in order:
            outputs[name], wall, cpu = timed(contenders[name], device)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name]), outputs[name]) for name in names}


def report(title: str, results: dict, tokens: int, baseline: str) -> None:
    print(f"\n{title}")
    base_wall = results[baseline][0]
    for name, (wall, cpu, _) in results.items():
        print(f"  {name:<34} {tokens / wall:9.1f} tok/s   wall {wall:7.3f} s   cpu {cpu:7.3f} s   "
              f"x{base_wall / wall:5.2f} vs {baseline}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="t5-small", help="a t5 preset (random weights)")
    parser.add_argument("--new", type=int, default=256, help="tokens to generate (no early stop)")
    parser.add_argument("--source", type=int, default=64, help="source tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-uncached", action="store_true", help="only the transformers comparison")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = EncDecConfig.from_name(args.preset, max_seq_len=max(args.new + 1, args.source, 64))
    ours = build_model(cfg, device=device, seed=0).eval()
    source = torch.randint(2, cfg.vocab_size, (args.batch, args.source), generator=torch.Generator().manual_seed(0))
    source = source.to(device)
    # No eos: every run generates exactly --new tokens, so the token counts (and the work) are equal.
    sampling = Seq2SeqConfig(max_new_tokens=args.new, num_beams=args.beams, stop_at_eos=False)
    tokens = args.batch * args.new
    print(f"model {args.preset} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params) on {device}, "
          f"source {args.source} x batch {args.batch}, {args.new} new tokens, beams {args.beams}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    generate_seq2seq(ours, source[:, :8], Seq2SeqConfig(max_new_tokens=4))  # warm-up

    if not args.skip_uncached:
        results = race({
            "no cache (recompute the target)": lambda: generate_seq2seq(ours, source, sampling, use_cache=False),
            "slmforge cache": lambda: generate_seq2seq(ours, source, sampling),
        }, args.repeats, device)
        report("cached vs uncached decoding (slmforge)", results, tokens, "no cache (recompute the target)")
        same = torch.equal(*(out for _, _, out in results.values()))
        print(f"  identical tokens: {same}")

    try:
        import transformers
    except ImportError:
        print("\ntransformers is not installed: skipping the comparison with its generate")
        return
    hf_config = transformers.T5Config(**{k: v for k, v in config_to_hf(cfg).items()
                                         if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    theirs = transformers.T5ForConditionalGeneration(hf_config).to(device).eval()
    if not cfg.tie_embeddings and theirs.lm_head.weight is theirs.shared.weight:
        # transformers 5 builds every T5 with lm_head tied to shared; loading untied weights into one
        # tensor would let the second overwrite the first, so the head gets its own first.
        theirs.lm_head.weight = torch.nn.Parameter(torch.empty_like(theirs.shared.weight))
    missing, unexpected = theirs.load_state_dict(state_dict_to_hf(cfg, ours.state_dict()), strict=False)
    assert not unexpected and all(name.endswith("embed_tokens.weight") for name in missing), (missing, unexpected)
    mask = torch.ones_like(source)

    def hf_generate():
        with torch.no_grad():
            out = theirs.generate(input_ids=source, attention_mask=mask, max_new_tokens=args.new,
                                  min_new_tokens=args.new, num_beams=args.beams, do_sample=False,
                                  eos_token_id=None)
        return out[:, 1:]

    hf_generate()  # warm-up
    results = race({"transformers generate": hf_generate,
                    "slmforge generate_seq2seq": lambda: generate_seq2seq(ours, source, sampling)},
                   args.repeats, device)
    report(f"slmforge vs transformers {transformers.__version__} (same weights, both cached)", results, tokens,
           "transformers generate")
    (_, _, a), (_, _, b) = results.values()
    print(f"  identical tokens: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
