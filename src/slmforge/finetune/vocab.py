"""Tokens a fine-tuning task needs (chat markers, fill-in-the-middle sentinels), added to the run's
tokenizer as special tokens, and embedding rows for them in the model."""

from __future__ import annotations

import torch
from torch import nn

from slmforge.formatting import say


def add_special_tokens(tokenizer, tokens: tuple[str, ...], chat_template: str | None):
    """A new Tokenizer with `tokens` added (those missing) and the chat template recorded for export.
    Returns (tokenizer, ids of the added tokens)."""
    from tokenizers import AddedToken, Tokenizer as BackendTokenizer

    from slmforge.tokenizer import Tokenizer

    backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    missing = [t for t in tokens if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    meta = dict(tokenizer.meta)
    settings = dict(meta.get("hf_settings", {}))
    if chat_template:
        settings["chat_template"] = chat_template
    meta["hf_settings"] = settings
    meta.pop("tokenizer_sha256", None)
    grown = Tokenizer(backend, dict(tokenizer.roles), list(tokenizer.sentinels), meta)
    return grown, [grown.token_to_id(t) for t in missing]


@torch.no_grad()
def fit_embeddings(model: nn.Module, vocab_size: int, new_ids: list[int]) -> None:
    """Grow the decoder's embedding (and untied head) to `vocab_size` rows if needed, and start the
    rows of new tokens at the mean of the existing rows (a neutral point the fine-tuning moves from)."""
    cfg = model.cfg
    old = model.embed.weight
    rows = old.shape[0]
    if vocab_size > rows:
        model.embed = _grown_embedding(model.embed, vocab_size)
        if model.lm_head is not None:
            model.lm_head = _grown_linear(model.lm_head, vocab_size)
        cfg.vocab_size = vocab_size
        say(f"embedding grown from {rows} to {vocab_size} rows for the added tokens")
    fresh = [i for i in new_ids if i is not None]
    if not fresh:
        return
    known = torch.ones(model.embed.weight.shape[0], dtype=torch.bool)
    known[fresh] = False
    known[rows:] = False
    model.embed.weight[fresh] = model.embed.weight[known].mean(0)
    if model.lm_head is not None:
        model.lm_head.weight[fresh] = model.lm_head.weight[known].mean(0)


def _grown_embedding(embedding: nn.Embedding, rows: int) -> nn.Embedding:
    grown = nn.Embedding(rows, embedding.embedding_dim, device=embedding.weight.device, dtype=embedding.weight.dtype)
    grown.weight[:embedding.num_embeddings] = embedding.weight
    return grown


def _grown_linear(linear: nn.Linear, rows: int) -> nn.Linear:
    grown = nn.Linear(linear.in_features, rows, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    grown.weight[:linear.out_features] = linear.weight
    if linear.bias is not None:
        grown.bias.zero_()
        grown.bias[:linear.out_features] = linear.bias
    return grown
