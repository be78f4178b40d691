"""Evaluate a trained model with its own objective, on prepared shards or raw text files (per language).

Causal LMs report loss, perplexity and bits per byte; masked LMs report the masked-token loss,
perplexity (exp of that loss) and masked-token accuracy, with masks drawn from a fixed seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from slmforge import config as config_io
from slmforge.checkpoint.reading import Run
from slmforge.data.encode import encoded_text_bytes
from slmforge.data.loader import WindowLoader
from slmforge.data.shards import ShardSet
from slmforge.errors import SlmforgeError
from slmforge.objectives import DEFAULT_FOR_KIND, ObjectiveConfig, build_objective, mean_loss, summarize


def run_objective(run: Run, tokenizer=None):
    """The objective a run was trained with (meta.json), or its family's default for older runs."""
    recorded = run.info.objective or {"kind": DEFAULT_FOR_KIND[run.kind]}
    cfg = config_io.parse(ObjectiveConfig, recorded, "objective")
    # mask token / sentinels and eos; eos also where causal LM keeps documents apart
    if (cfg.kind in ("mlm", "span") or getattr(cfg, "documents", False)) and tokenizer is None:
        tokenizer = run.tokenizer()
    return build_objective(cfg, run.kind, run.model.cfg.family, tokenizer, where=str(run.step_dir))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def evaluate_shards(model, objective, folder: str | Path, split: str = "val", seq_len: int | None = None,
                    batch_size: int = 8, max_batches: int | None = None) -> dict[str, float]:
    """The objective's loss and metrics over a split of prepared data."""
    shards = ShardSet(folder, split)
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    loader = WindowLoader(shards, seq_len, batch_size, shuffle=False, training=False,
                          window=objective.window_tokens(seq_len))
    means, tokens = mean_loss(model, objective, loader.epoch_batches(max_batches), _device(model))
    return {**summarize(means, shards.bytes_per_token if objective.bits_per_byte else None), "tokens": tokens}


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


def text_windows(ids: list[int], scored: list[bool], seq_len: int, window: int | None = None
                 ) -> list[dict[str, torch.Tensor]]:
    """Raw batches of one window each, starting every seq_len tokens. With window = seq_len + 1 (causal
    LM) windows overlap by one, so every token after the first is predicted exactly once."""
    window = window if window is not None else seq_len + 1
    overlap = window - seq_len
    windows = []
    for index, start in enumerate(range(0, max(len(ids) - overlap, 0), seq_len)):
        tokens = torch.tensor(ids[start:start + window])
        keep = torch.tensor(scored[start:start + window])
        windows.append({"tokens": tokens[None], "scored": keep[None], "sample_ids": torch.tensor([index])})
    return windows


def evaluate_documents(model, objective, tokenizer, documents: list[str], seq_len: int | None = None,
                       name: str = "text", add_bos: bool = True) -> dict[str, float]:
    """The objective's metrics on `documents`; for causal LMs the exact bits per byte: nats over every
    scored token / ln 2 / the UTF-8 bytes of their text as the tokenizer normalizes it (NFC)."""
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise SlmforgeError(f"{name}: no text to evaluate")
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    ids, scored = document_stream(tokenizer, documents, add_bos)
    windows = text_windows(ids, scored, seq_len, objective.window_tokens(seq_len))
    means, tokens = mean_loss(model, objective, windows, _device(model))
    num_bytes = encoded_text_bytes(tokenizer, documents)  # of the normalized text, as in the manifests
    bytes_per_token = num_bytes / tokens if objective.bits_per_byte and tokens else None
    return {**summarize(means, bytes_per_token), "tokens": tokens, "bytes": num_bytes, "documents": len(documents)}


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


# Optional columns, in order: (metric, header, format); shown when any row has the metric.
COLUMNS = (("bpb", "bpb", ".4f"), ("accuracy", "accuracy", ".4f"), ("macro_f1", "macro-F1", ".4f"),
           ("f1", "entity F1", ".4f"), ("exact_match", "exact", ".3f"),
           ("chrf", "chrF", ".1f"), ("bleu", "BLEU", ".1f"), ("skipped", "skipped", "d"))


def print_table(rows: dict[str, dict[str, float]], out=None) -> None:
    """One row per evaluated set; columns the metrics any row has (bits per byte for causal LMs,
    accuracy, and exact match / chrF / BLEU / skipped examples for fine-tuned runs' --examples; macro-F1
    or entity F1 for classify / tag runs')."""
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a replaced stdout
    shown = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    out.write(f"{'set':<24}{'tokens':>10}{'loss':>10}{'ppl':>12}" + "".join(f"{h:>10}" for _, h, _ in shown) + "\n")
    for name, r in rows.items():
        line = f"{name:<24}{int(r.get('tokens', 0)):>10}{r['loss']:>10.4f}{r['ppl']:>12.3f}"
        for metric, _, fmt in shown:
            line += f"{r[metric]:>10{fmt}}" if metric in r else f"{'-':>10}"
        out.write(line + "\n")
