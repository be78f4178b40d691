"""Evaluate a trained model on prepared shards or on raw text files (per language)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from slmforge.data.loader import WindowLoader
from slmforge.data.shards import ShardSet
from slmforge.errors import SlmforgeError
from slmforge.eval.loss import mean_loss, summarize
from slmforge.objectives.clm import CausalLM


def evaluate_shards(model, folder: str | Path, split: str = "val", seq_len: int | None = None,
                    batch_size: int = 8, max_batches: int | None = None) -> dict[str, float]:
    """Loss / perplexity / bits per byte over a split of prepared data."""
    shards = ShardSet(folder, split)
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    loader = WindowLoader(shards, seq_len, batch_size, shuffle=False, training=False)
    device = model.embed.weight.device
    loss, tokens = mean_loss(model, CausalLM(), loader.epoch_batches(max_batches), device)
    return {**summarize(loss, shards.bytes_per_token), "tokens": tokens}


def document_stream(tokenizer, documents: list[str], add_bos: bool = True) -> tuple[list[int], list[bool]]:
    """Documents laid out as in training shards, `[bos] tokens eos` each, and which positions to score.

    Text is encoded literally, as `data prepare` does. A bos token is never scored (it carries no text
    and is trivially predictable after eos).
    """
    bos = tokenizer.bos_id if add_bos else None
    ids: list[int] = []
    scored: list[bool] = []
    literal = tokenizer.backend.encode_special_tokens
    tokenizer.treat_special_strings_as_text()
    try:
        encoded = tokenizer.encode_batch(documents)
    finally:
        tokenizer.backend.encode_special_tokens = literal  # leave the caller's tokenizer as it was
    for body in encoded:
        body = body + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if bos is not None:
            ids.append(bos)
            scored.append(False)
        ids.extend(body)
        scored.extend([True] * len(body))
    return ids, scored


def text_windows(ids: list[int], scored: list[bool], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Windows of seq_len + 1 tokens overlapping by one, so every token after the first is predicted once."""
    windows = []
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        chunk = torch.tensor(ids[start:start + seq_len + 1])
        keep = torch.tensor(scored[start + 1:start + seq_len + 1])
        targets = torch.where(keep, chunk[1:], torch.full_like(chunk[1:], -100))
        windows.append({"input_ids": chunk[None, :-1], "targets": targets[None]})
    return windows


def evaluate_documents(model, tokenizer, documents: list[str], seq_len: int | None = None,
                       name: str = "text", add_bos: bool = True) -> dict[str, float]:
    """Exact bits per byte of `documents`: nats over every scored token / ln 2 / their UTF-8 bytes."""
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise SlmforgeError(f"{name}: no text to evaluate")
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    ids, scored = document_stream(tokenizer, documents, add_bos)
    device = model.embed.weight.device
    loss, tokens = mean_loss(model, CausalLM(), text_windows(ids, scored, seq_len), device)
    num_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return {**summarize(loss, num_bytes / tokens), "tokens": tokens, "bytes": num_bytes,
            "documents": len(documents)}


def read_documents(path: str | Path) -> list[str]:
    """A UTF-8 text file as documents, one per non-empty line."""
    return [line for line in read_text_file(path).splitlines() if line.strip()]


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlmforgeError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None


def print_table(rows: dict[str, dict[str, float]], out=sys.stdout) -> None:
    out.write(f"{'set':<24}{'tokens':>10}{'loss':>10}{'ppl':>12}{'bpb':>10}\n")
    for name, r in rows.items():
        bpb = f"{r['bpb']:.4f}" if "bpb" in r else "-"
        out.write(f"{name:<24}{int(r.get('tokens', 0)):>10}{r['loss']:>10.4f}{r['ppl']:>12.3f}{bpb:>10}\n")


def write_report(rows: dict[str, dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
