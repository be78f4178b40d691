"""Packed rows: several documents (fine-tuning examples) share one row of a batch, and none may see
another. Positions restart at 0 where a document starts, and attention stays inside the document,
so a packed row computes exactly what each document alone would."""

from __future__ import annotations

import torch


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) position of each token within its document."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_causal_mask(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: a query sees earlier tokens of its own document (within `window`
    tokens, the token itself included, for sliding-window layers)."""
    T = document_ids.shape[1]
    query = torch.arange(T, device=document_ids.device)[:, None]
    key = torch.arange(T, device=document_ids.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & allowed)[:, None]
