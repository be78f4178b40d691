"""Decoding throughput: slmforge's `generate_ids` (KV cache; window-sized ring caches on sliding
layers) against transformers' `generate`, greedy, same weights, prompt and number of new tokens.
The tokens are compared: `identical` says how many of each row's new tokens agree (near-ties of a
random model can flip an argmax in bf16; in float32 they should all agree)."""

from __future__ import annotations

import torch

from benchmarks.common import Row, interleave, timing_note
from benchmarks.models import build_pair, describe
from benchmarks.shapes import ShapeSet
from slmforge.generate import SamplingConfig, cpu_threads, decode_threads, generate_ids


def run(shapes: ShapeSet, device: torch.device, log=print) -> list[Row]:
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

            def ours_run():
                outputs["slmforge"] = generate_ids(ours, prompt, sampling)

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
            log(f"  {label}: slmforge {rate['slmforge']:,.0f} tok/s, transformers {rate['transformers']:,.0f} tok/s "
                f"({rate['slmforge'] / rate['transformers']:.2f}x), identical {same_prefix}/{case.new}")
    return rows
