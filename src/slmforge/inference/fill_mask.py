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


def fill_mask(model, tokenizer, text: str, top_k: int = 5, add_bos: bool = True) -> list[list[Guess]]:
    """For each mask in `text`, in order, the `top_k` most likely tokens with their probabilities."""
    return fill_masks(model, tokenizer, [text], top_k, add_bos)[0]


@torch.no_grad()
def fill_masks(model, tokenizer, texts: list[str], top_k: int = 5, add_bos: bool = True,
               batch_size: int = 32) -> list[list[list[Guess]]]:
    """`fill_mask` of every text, in right-padded batches (the attention mask hides the padding, so a
    text's guesses do not depend on its batch mates; tested).

    A text is laid out as training laid out documents (`[bos] tokens eos`: [CLS] ... [SEP] for a
    BERT vocabulary, <s> ... </s> for RoBERTa's)."""
    if top_k < 1:
        raise SlmforgeError(f"--top-k: must be at least 1, got {top_k}")
    laid_out = [_layout(model, tokenizer, text, add_bos, n if len(texts) > 1 else None)
                for n, text in enumerate(texts, 1)]
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    results: list[list[list[Guess]]] = []
    for start in range(0, len(laid_out), batch_size):
        batch = laid_out[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in batch], device=device)
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in batch], device=device)
        hidden = model(ids, attention_mask=attention)  # (B, T, d)
        rows = torch.tensor([r for r, (_, positions) in enumerate(batch) for _ in positions], device=device)
        columns = torch.tensor([p for _, positions in batch for p in positions], device=device)
        probs = torch.softmax(model.logits(hidden[rows, columns]).float(), dim=-1)  # (masks in batch, V)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        guesses = [[Guess(tokenizer.decode([int(i)], skip_special=False), int(i), float(p))
                    for p, i in zip(row_p, row_i)] for row_p, row_i in zip(top.values, top.indices)]
        for _, positions in batch:
            results.append(guesses[:len(positions)])
            guesses = guesses[len(positions):]
    return results


def _layout(model, tokenizer, text: str, add_bos: bool, number: int | None) -> tuple[list[int], list[int]]:
    """(token ids, mask positions) of one text; `number` names it in errors when there are several."""
    which = "the text" if number is None else f"text {number}"
    ids = tokenizer.encode(with_tokenizer_mask(text, tokenizer))  # special tokens typed in the text count
    if add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    if len(ids) > model.cfg.max_seq_len:
        raise SlmforgeError(f"{which} is {len(ids)} tokens, longer than the model's {model.cfg.max_seq_len}")
    positions = [i for i, token in enumerate(ids) if token == tokenizer.mask_id]
    if not positions:
        raise SlmforgeError(f"no mask in {which}; write it as {' or '.join(MASK_ALIASES)}")
    return ids, positions
