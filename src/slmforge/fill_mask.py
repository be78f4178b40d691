"""`slmforge fill-mask`: a masked LM's top-k guesses for every mask in a text (seed 001's demo)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from slmforge.errors import SlmforgeError

# Spellings of the mask a user may type, whatever the tokenizer's own mask token is.
MASK_ALIASES = ("[MASK]", "<mask>")


@dataclass
class Guess:
    token: str
    id: int
    probability: float


def with_tokenizer_mask(text: str, tokenizer) -> str:
    """`text` with every mask alias written as the tokenizer's own mask token."""
    mask = tokenizer.roles.get("mask")
    if mask is None:
        raise SlmforgeError("the run's tokenizer has no mask token, so this model cannot fill masks")
    for alias in MASK_ALIASES:
        text = text.replace(alias, mask)
    return text


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5, add_bos: bool = True) -> list[list[Guess]]:
    """For each mask in `text`, in order, the `top_k` most likely tokens with their probabilities.

    The text is laid out as training laid out documents (`[bos] tokens eos`: [CLS] ... [SEP] for a
    BERT vocabulary, <s> ... </s> for RoBERTa's)."""
    if top_k < 1:
        raise SlmforgeError(f"--top-k: must be at least 1, got {top_k}")
    ids = tokenizer.encode(with_tokenizer_mask(text, tokenizer))  # special tokens typed in the text count
    if add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    if len(ids) > model.cfg.max_seq_len:
        raise SlmforgeError(f"the text is {len(ids)} tokens, longer than the model's {model.cfg.max_seq_len}")
    positions = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    if not positions:
        raise SlmforgeError(f"no mask in the text; write it as {' or '.join(MASK_ALIASES)}")
    model.eval()
    device = next(model.parameters()).device
    hidden = model(torch.tensor([ids], device=device))  # (1, T, d)
    probs = torch.softmax(model.logits(hidden[0, positions]).float(), dim=-1)  # (masks, V)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[Guess(tokenizer.decode([int(i)], skip_special=False), int(i), float(p))
             for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(top.values, top.indices)]


# ---------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from slmforge.arguments import HelpFormatter

    p = sub.add_parser("fill-mask", help="a masked LM's top-k tokens for each [MASK] in a text",
                       description="Print the most likely tokens and their probabilities for every mask in TEXT,\n"
                                   "written as [MASK] or <mask> (or the tokenizer's own mask token).\n\n"
                                   "example:\n  slmforge fill-mask runs/bert \"the capital of france is [MASK].\"",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="run folder or checkpoint folder of an encoder (masked LM)")
    p.add_argument("text", help="text with one or more masks")
    p.add_argument("--top-k", type=int, default=5, help="guesses per mask (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list (one list of guesses per mask)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slmforge.runs import open_run
    from slmforge.runtime import resolve_device

    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    if run.kind != "encoder":
        raise SlmforgeError(f"{args.model}: a {run.model.cfg.family} decoder continues text rather than filling "
                            f"masks; use `slmforge generate {args.model} -p \"...\"`")
    guesses = fill_mask(run.model, run.tokenizer(), args.text, args.top_k, run.meta.get("add_bos", True))
    if args.json:
        print(json.dumps([[vars(g) for g in per_mask] for per_mask in guesses], indent=2, ensure_ascii=False))
        return 0
    for n, per_mask in enumerate(guesses, 1):
        sys.stdout.write(f"mask {n}:\n")
        for g in per_mask:
            sys.stdout.write(f"  {g.probability:8.4f}  {g.token!r}\n")
    return 0
