"""llama.cpp (llama-cpp-python) against slmforge's inference engine on CPU, for the same model: one small
Llama decoder built here (random weights, scaled so that every layer moves the logits) with a byte-
fallback BPE tokenizer trained here, saved as a run, exported with `export_gguf` (`slmforge export RUN
--format gguf`) as f32, f16 and q8_0, and decoded greedily at batch 1 from the same prompt ids.

Each run of a side times two phases apart, wall and process CPU time (every thread of the process):
- prompt processing (pp): the prompt through the model into an empty cache, and the first token chosen;
- generation (tg): the remaining new tokens, one step each (from the first token chosen to the last).
slmforge: `Engine.stream` (max_batch 1, `threads` fixed), the phases split at the first event. llama.cpp:
`Llama.reset` + `Llama.eval(prompt)`, then argmax of the last logits and `Llama.eval([token])` per
token (llama-cpp-python's low-level loop; `Llama.generate` would reuse the cached prompt between runs).
Both sides at the same thread count (torch intra-op threads; llama.cpp n_threads = n_threads_batch),
llama.cpp with its defaults otherwise (f16 KV cache unless --kv f32, n_batch 512). Sides alternate round by round (and
which goes first); medians of the rounds. `same` counts the new tokens equal to slmforge's.

    python -m benchmarks.bench_llamacpp [--threads 1 2] [--prompt 128] [--new 64] [--rounds 5]
        [--dtypes q8_0 f16 f32] [--hidden 256] [--layers 6] [--kv f16|f32]

Ratios are llama.cpp tokens/s over slmforge tokens/s (above 1: llama.cpp is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slmforge.checkpoint.writing import save_checkpoint
from slmforge.inference import Engine, SamplingParams
from slmforge.interop.gguf import export_gguf
from slmforge.models import DecoderConfig, build_model
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

CORPUS = [
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "मैं कल बाज़ार जाऊँगा और ज़रूरी सामान ख़रीदूँगा।",
    "বাংলা ভাষা খুব মিষ্টি। আমি কাল কলকাতায় যাব।",
    "অসমীয়া ভাষা অসমৰ ৰাজ্যিক ভাষা আৰু ইয়াক বহু লোকে কয়।",
    "Die Straße in München ist im Winter sehr schön.",
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can be trained on a single machine in 2024.",
] * 8


def build_run(root: Path, hidden: int, layers: int) -> tuple[Path, torch.nn.Module, object]:
    tokenizer_dir = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=700), root / "tokenizer", CORPUS)
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = DecoderConfig.from_name("llama-tiny", vocab_size=768, hidden_size=hidden, num_layers=layers,
                                  num_heads=hidden // 32, num_kv_heads=hidden // 64, intermediate_size=3 * hidden,
                                  max_seq_len=512, tie_embeddings=False)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # random weights at a scale where greedy text varies (as tests/test_gguf.py)
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if param.ndim == 1 else noise / param.shape[-1] ** 0.5)
    run = root / "run"
    save_checkpoint(run, 1, model, extra_meta={"add_bos": True, "tokenizer_sha256": tokenizer.sha256})
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    return run, model, tokenizer


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def slmforge_run(engine: Engine, prompt: list[int], new: int) -> tuple[list[int], tuple[float, ...]]:
    params = SamplingParams(max_new_tokens=new, stop_at_eos=False)  # greedy
    tokens = []
    wall0, cpu0 = clocks()
    for event in engine.stream([prompt], params):
        if not tokens:
            wall1, cpu1 = clocks()
        tokens.append(event.token_id)
    wall2, cpu2 = clocks()
    return tokens, (wall1 - wall0, cpu1 - cpu0, wall2 - wall1, cpu2 - cpu1)


def llama_run(llm, prompt: list[int], new: int) -> tuple[list[int], tuple[float, ...]]:
    vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).argmax())

    wall0, cpu0 = clocks()
    llm.reset()
    llm.eval(prompt)
    tokens = [argmax()]
    wall1, cpu1 = clocks()
    while len(tokens) < new:
        llm.eval(tokens[-1:])
        tokens.append(argmax())
    wall2, cpu2 = clocks()
    return tokens, (wall1 - wall0, cpu1 - cpu0, wall2 - wall1, cpu2 - cpu1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens (the first one is part of pp)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["q8_0", "f16", "f32"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--kv", choices=["f16", "f32"], default="f16",
                        help="llama.cpp's KV cache type (f16: its default; f32: as slmforge's)")
    args = parser.parse_args()

    import llama_cpp

    root = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    try:
        run, model, tokenizer = build_run(root, args.hidden, args.layers)
        files = {dtype: export_gguf(run, root / f"model-{dtype}.gguf", dtype=dtype).path for dtype in args.dtypes}
        text = " ".join(CORPUS)
        prompt = ([tokenizer.bos_id] + tokenizer.encode(text))[:args.prompt]
        if len(prompt) < args.prompt:
            raise SystemExit(f"the corpus gives {len(prompt)} prompt tokens, fewer than --prompt {args.prompt}")
        print(f"llama decoder {model.cfg.num_parameters() / 1e6:.2f}M parameters (hidden {args.hidden}, "
              f"{args.layers} layers, vocab {model.cfg.vocab_size}), random weights; prompt {args.prompt} tokens, "
              f"{args.new} new, greedy, batch 1; llama.cpp KV cache {args.kv}; llama-cpp-python {llama_cpp.__version__}, torch "
              f"{torch.__version__}; cpus visible {os.cpu_count()}, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.rounds} interleaved rounds (medians)")
        header = (f"{'threads':>7} {'side':>15} {'pp tok/s':>9} {'pp cpu s':>9} {'tg tok/s':>9} {'tg cpu s':>9} "
                  f"{'pp ratio wall, cpu':>19} {'tg ratio wall, cpu':>19} {'same':>6}")
        print(header)
        for threads in args.threads:
            torch.set_num_threads(threads)
            engine = Engine(model, max_batch=1, threads=threads)
            sides = {"slmforge f32": lambda: slmforge_run(engine, prompt, args.new)}
            for dtype, path in files.items():
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads,
                                      n_threads_batch=threads, verbose=False,
                                      **({"type_k": 0, "type_v": 0} if args.kv == "f32" else {}))  # 0: GGML_TYPE_F32
                sides[f"llama.cpp {dtype}"] = lambda llm=llm: llama_run(llm, prompt, args.new)
            tokens = {name: side()[0] for name, side in sides.items()}  # warm-up, and the tokens to compare
            times: dict[str, list[tuple[float, ...]]] = {name: [] for name in sides}
            names = list(sides)
            for index in range(args.rounds):
                for name in (names if index % 2 == 0 else names[::-1]):
                    times[name].append(sides[name]()[1])
            medians = {name: [statistics.median(t[i] for t in times[name]) for i in range(4)] for name in names}
            ours = medians["slmforge f32"]
            for name in names:
                pp_wall, pp_cpu, tg_wall, tg_cpu = medians[name]
                pp_rate, tg_rate = args.prompt / pp_wall, (args.new - 1) / tg_wall
                ratios = ""
                if name != "slmforge f32":  # llama.cpp tokens/s over slmforge's = slmforge time / llama.cpp time
                    ratios = (f"{ours[0] / pp_wall:>8.2f}x, {ours[1] / pp_cpu:.2f}x "
                              f"{ours[2] / tg_wall:>8.2f}x, {ours[3] / tg_cpu:.2f}x")
                else:
                    ratios = f"{'':>19} {'':>19}"
                same = sum(a == b for a, b in zip(tokens[name], tokens["slmforge f32"]))
                print(f"{threads:>7} {name:>15} {pp_rate:>9.0f} {pp_cpu:>9.4f} {tg_rate:>9.0f} {tg_cpu:>9.4f} "
                      f"{ratios} {same:>3}/{args.new}")
            for side in sides.values():
                llm = getattr(side, "__defaults__", None)
                if llm:
                    llm[0].close()
        print("pp: prompt tokens/s (prompt + first token chosen); tg: new tokens/s after the first; cpu s: "
              "process CPU seconds of the phase; ratio = llama.cpp tokens/s / slmforge tokens/s (wall, cpu)")
        print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
