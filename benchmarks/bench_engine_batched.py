"""Batched decoding of prompts of different lengths: slmforge's inference engine (`Engine.generate`:
left-padded rows in one KV cache, greedy) against transformers' `generate` on the same left-padded
batch with its attention mask, same weights (one random-weight model built by slmforge and loaded
into transformers' LlamaForCausalLM through the export adapter), same prompts and number of new
tokens. Sides alternate round by round (benchmarks.common.interleave); wall and process CPU time are
both reported; the tokens are compared (`identical`: new tokens that agree, summed over the rows).

    python -m benchmarks.bench_engine_batched [--preset llama-tiny] [--batches 1 8 32] [--new 32]
        [--prompt-min 4] [--prompt-max 48] [--rounds 3] [--device cpu] [--compile]

With --compile a third side runs the engine with compile=true (the fixed-shape step through
torch.compile: inductor on CPU, CUDA graphs on a GPU); its compile (once per batch size) is timed apart,
in a first call, and left out of the rounds.

The issue's target: >= 1.3x transformers at batch 8 on CPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import interleave, timing_note
from benchmarks.models import build_pair, describe
from slmforge.inference import Engine, SamplingParams
from slmforge.inference.decoding import cpu_threads, decode_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--prompt-min", type=int, default=4)
    parser.add_argument("--prompt-max", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time the engine with compile=true")
    args = parser.parse_args()

    import transformers

    device = torch.device(args.device)
    cfg, ours, theirs = build_pair({"preset": args.preset}, device)
    ours, theirs = ours.eval(), theirs.eval()
    params = SamplingParams(max_new_tokens=args.new, stop_at_eos=False)  # greedy
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                                           eos_token_id=None, pad_token_id=0)
    print(f"{describe(cfg)}; {args.device}, float32, torch threads {torch.get_num_threads()}, "
          f"cpus visible {os.cpu_count()}; prompts of {args.prompt_min}-{args.prompt_max} tokens + {args.new} new, "
          f"greedy; {args.rounds} interleaved rounds (medians)")
    print(f"{'batch':>5} {'slmforge tok/s':>15} {'transformers tok/s':>19} {'ratio wall':>10} {'ratio cpu':>9} "
          f"{'identical':>10}")
    notes = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (batch,), generator=generator).tolist()
        prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]
        width = max(lengths)
        padded = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding, as transformers wants for decoder-only batches
            padded[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        padded, mask = padded.to(device), mask.to(device)
        engine = Engine(ours, max_batch=batch)  # kept across rounds, as a server keeps it
        outputs = {}
        threads = decode_threads(ours, batch, device)

        def ours_run():
            outputs["slmforge"] = [c.token_ids for c in engine.generate(prompts, params)]

        def theirs_run(threads=None, key="transformers"):
            with torch.no_grad(), cpu_threads(threads):
                out = theirs.generate(padded, attention_mask=mask, generation_config=config)
            outputs[key] = out[:, width:].tolist()

        sides = {"slmforge": ours_run, "transformers": theirs_run}
        if device.type == "cpu" and threads != torch.get_num_threads():
            sides["transformers, same threads"] = lambda: theirs_run(threads, "same")
        compile_note = ""
        if args.compile:
            compiled = Engine(ours, max_batch=batch, max_len=width + args.new, compile=True)

            def compiled_run():
                outputs["compiled"] = [c.token_ids for c in compiled.generate(prompts, params)]

            start = time.perf_counter()
            compiled_run()  # the compile, not timed below
            compile_note = f"; compile {time.perf_counter() - start:.1f} s"
            sides["slmforge, compiled"] = compiled_run
        timings = interleave(sides, args.rounds, device)
        identical = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(outputs["slmforge"], outputs["transformers"]))
        tokens = batch * args.new
        ours_t, theirs_t = timings["slmforge"], timings["transformers"]
        print(f"{batch:>5} {tokens / ours_t.median_wall:>15.1f} {tokens / theirs_t.median_wall:>19.1f} "
              f"{theirs_t.median_wall / ours_t.median_wall:>9.2f}x {theirs_t.median_cpu / ours_t.median_cpu:>8.2f}x "
              f"{identical:>5}/{tokens}")
        if args.compile:
            fast = timings["slmforge, compiled"]
            same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(outputs["compiled"], outputs["transformers"]))
            print(f"{'':>5} {tokens / fast.median_wall:>15.1f} {'(compiled)':>19} "
                  f"{theirs_t.median_wall / fast.median_wall:>9.2f}x {theirs_t.median_cpu / fast.median_cpu:>8.2f}x "
                  f"{same:>5}/{tokens}")
        notes.append(f"batch {batch} (prompt lengths {min(lengths)}-{max(lengths)}; slmforge {threads} thread(s)): "
                     + timing_note(timings) + compile_note)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
