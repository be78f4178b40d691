"""A masked LM's top-k guesses for every mask in a text (seed 001's demo; the `fill-mask` verb is in
inference/commands.py)."""

from __future__ import annotations

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
