"""Decoding throughput: slmforge's `generate_ids` (KV cache; window-sized ring caches on sliding
layers) against transformers' `generate`, greedy, same weights, prompt and number of new tokens.
The tokens are compared: `identical` says how many of each row's new tokens agree (near-ties of a
random model can flip an argmax in bf16; in float32 they should all agree).

With `compiled` (the default on CUDA, `--compile` on CPU) a third side decodes with slmforge's compiled
static step (`compile=true`: CUDA graphs on a GPU, inductor on CPU); its compile is timed apart, in the
first call, and left out of the rounds, and its row also gives the ratio to slmforge's ordinary path."""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks.common import Row, interleave, synchronize, timing_note
from benchmarks.models import build_pair, describe
from benchmarks.shapes import ShapeSet
from slmforge.inference.generate import SamplingConfig, cpu_threads, decode_threads, generate_ids


def run(shapes: ShapeSet, device: torch.device, log=print, compiled: bool = False) -> list[Row]:
    import transformers

    dtype = torch.bfloat16 if shapes.dtype == "bfloat16" else torch.float32
    rows = []
    for case in shapes.decoding:
        cfg, ours, theirs = build_pair({**case.model, "max_seq_len": max(case.model.get("max_seq_len", 0),
                                                                          case.prompt + case.new)}, device)
        # Decoding runs in the weights' dtype on both sides (bf16 weights on GPU, as served).
        ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
        sampling = SamplingConfig(max_new_tokens=case.new, temperature=0, stop_at_eos=False)
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=case.new, min_new_tokens=case.new,
                                               eos_token_id=None, pad_token_id=0)
        for batch in case.batches:
            prompt = torch.randint(0, cfg.vocab_size, (batch, case.prompt),
                                   generator=torch.Generator().manual_seed(batch)).to(device)
            mask = torch.ones_like(prompt)
            outputs = {}

            def ours_run(sampling=sampling, key="slmforge"):
                outputs[key] = generate_ids(ours, prompt, sampling)

            def theirs_run(threads=None, key="transformers"):
                with torch.no_grad(), cpu_threads(threads):
                    outputs[key] = theirs.generate(prompt, generation_config=config, attention_mask=mask)

            sides = {"slmforge": ours_run, "transformers": theirs_run}
            # slmforge picks its CPU thread count (generate.decode_threads); where that differs from
            # torch's, transformers is also timed with the same count, so the choice is visible apart.
            ours_threads = decode_threads(ours, batch, device)
            same_threads = device.type == "cpu" and ours_threads != torch.get_num_threads()
            if same_threads:
                sides["transformers, same threads"] = lambda: theirs_run(ours_threads, "same")
            compile_s = None
            if compiled:
                static = dataclasses.replace(sampling, compile=True)
                sides["slmforge, compiled"] = lambda: ours_run(static, "slmforge, compiled")
                synchronize(device)
                start = time.perf_counter()
                sides["slmforge, compiled"]()  # the compile (once per model and batch), not timed below
                synchronize(device)
                compile_s = time.perf_counter() - start
            timings = interleave(sides, shapes.rounds, device)
            a = outputs["slmforge"][:, case.prompt:]
            b = outputs["transformers"][:, case.prompt:]
            if a.shape != b.shape:
                raise SystemExit(f"{case.name}: slmforge made {tuple(a.shape)} tokens, transformers {tuple(b.shape)}")
            same_prefix = int((a == b).long().cumprod(dim=1).sum(dim=1).min())
            new_tokens = batch * case.new
            rate = {name: new_tokens / t.median_wall for name, t in timings.items()}
            label = f"{case.name}: batch {batch}, prompt {case.prompt} + {case.new} new, greedy, {shapes.dtype}"
            threads_note = (f"slmforge decoded with {ours_threads} thread(s) (its choice), transformers with "
                            f"torch's {torch.get_num_threads()}" if device.type == "cpu" else "")
            extra = {"identical_prefix": same_prefix, "new_tokens": case.new, "slmforge_threads": ours_threads,
                     "cpu_s": {n: t.median_cpu for n, t in timings.items()}}
            rows.append(Row("decoding", label, "new tokens/s", rate["slmforge"], rate["transformers"],
                            "transformers generate",
                            notes=f"{describe(cfg)}; identical tokens: {same_prefix}/{case.new} in every row; "
                                  f"{threads_note}; " + timing_note(timings), extra=extra))
            if same_threads:
                rows.append(Row("decoding", label, "new tokens/s, same threads", rate["slmforge"],
                                rate["transformers, same threads"], f"transformers generate, {ours_threads} thread(s)",
                                notes="both sides on slmforge's thread count", extra=extra))
            if compiled:
                c = outputs["slmforge, compiled"][:, case.prompt:]
                compiled_prefix = int((c == b).long().cumprod(dim=1).sum(dim=1).min())
                same_as_ours = bool(torch.equal(c, a))
                speedup = rate["slmforge, compiled"] / rate["slmforge"]
                rows.append(Row("decoding", label, "new tokens/s, compiled static decode", rate["slmforge, compiled"],
                                rate["transformers"], "transformers generate",
                                notes=f"slmforge compile=true ({'CUDA graphs' if device.type == 'cuda' else 'inductor'})"
                                      f": {speedup:.2f}x slmforge's ordinary cached decoding; compile {compile_s:.1f} s "
                                      f"(first call, not in the rounds); identical tokens: {compiled_prefix}/{case.new} "
                                      f"with transformers, {'all' if same_as_ours else 'NOT all'} with slmforge's "
                                      f"ordinary path; {threads_note}",
                                extra={**extra, "identical_prefix": compiled_prefix, "same_as_cached": same_as_ours,
                                       "compile_s": compile_s}))
            log(f"  {label}: slmforge {rate['slmforge']:,.0f} tok/s, transformers {rate['transformers']:,.0f} tok/s "
                f"({rate['slmforge'] / rate['transformers']:.2f}x), identical {same_prefix}/{case.new}")
            if compiled:
                log(f"    compiled static decode {rate['slmforge, compiled']:,.0f} tok/s "
                    f"({rate['slmforge, compiled'] / rate['transformers']:.2f}x transformers, {speedup:.2f}x cached; "
                    f"compile {compile_s:.1f} s), identical {compiled_prefix}/{case.new}")
    return rows
