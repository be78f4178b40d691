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
    seq_len = seq_len or model.cfg.max_seq_len
    loader = WindowLoader(shards, seq_len, batch_size, shuffle=False, training=False)
    device = model.embed.weight.device
    loss, tokens = mean_loss(model, CausalLM(), loader.epoch_batches(max_batches), device)
    return {**summarize(loss, shards.bytes_per_token), "tokens": tokens}


def text_windows(ids: list[int], seq_len: int) -> list[torch.Tensor]:
    """Windows of seq_len + 1 tokens overlapping by one, so every token after the first is predicted once."""
    windows = []
    for start in range(0, max(len(ids) - 1, 0), seq_len):
        windows.append(torch.tensor(ids[start:start + seq_len + 1]))
    return windows


def evaluate_text(model, tokenizer, text: str, seq_len: int | None = None, name: str = "text") -> dict[str, float]:
    """Exact bits per byte of `text`: total nats over every token / ln 2 / UTF-8 bytes of the text."""
    if not text.strip():
        raise SlmforgeError(f"{name}: empty text")
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids  # so the first real token is predicted too
    device = model.embed.weight.device
    batches = ({"input_ids": w[None, :-1].to(device), "targets": w[None, 1:].to(device)}
               for w in text_windows(ids, seq_len))
    loss, tokens = mean_loss(model, CausalLM(), batches, device)
    num_bytes = len(text.encode("utf-8"))
    return {**summarize(loss, num_bytes / tokens), "tokens": tokens, "bytes": num_bytes}


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
