"""Cut a tokenizer's vocabulary down to the tokens a corpus uses (a multilingual teacher's 250k
vocabulary -> the few thousand tokens Hindi text needs), keeping the pipeline and every kept
token's string, so the cut tokenizer segments that corpus exactly as the full one does:

- Unigram: the best segmentation of a text only uses tokens it uses; removing unused pieces removes
  only alternatives the Viterbi search did not pick.
- BPE: a merge whose result the corpus never produced (as a token or on the way to one) was never
  applied to it; tokens are kept with everything they are merged from, and only merges among kept
  tokens remain.
- WordPiece: longest-match-first picks the same pieces when only unpicked ones are removed.

Special tokens, and the 256 byte tokens of a byte-fallback model (so that unseen text still encodes
without unknowns), are always kept. Ids are renumbered in the original order; `kept_ids[new] = old`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from slmforge.errors import SlmforgeError


@dataclass
class TrimReport:
    vocab_before: int
    vocab_after: int
    corpus_tokens: int
    kept_ids: list[int] = field(repr=False)
    """Old id of each new id."""
    covered_tokens: int = 0
    """Corpus tokens (as the full tokenizer encodes the corpus) whose token was kept."""
    changed_documents: int = 0
    """Documents the cut tokenizer encodes differently (only with min_count > 1, or text unlike the corpus)."""
    unk_after: int = 0
    byte_tokens_after: int = 0

    def as_dict(self) -> dict:
        return {"vocab_before": self.vocab_before, "vocab_after": self.vocab_after,
                "kept_share": self.vocab_after / max(self.vocab_before, 1), "corpus_tokens": self.corpus_tokens,
                "covered_share": self.covered_tokens / max(self.corpus_tokens, 1),
                "changed_documents": self.changed_documents, "unk_tokens_after": self.unk_after,
                "byte_tokens_after": self.byte_tokens_after}


def count_tokens(tokenizer, documents: Iterable[str], batch: int = 1000) -> tuple[Counter, int]:
    """How often each id occurs when `tokenizer` encodes `documents` (with its special tokens)."""
    counts: Counter = Counter()
    pending, docs = [], 0
    for text in documents:
        pending.append(text)
        docs += 1
        if len(pending) >= batch:
            for ids in tokenizer.encode_batch(pending, add_special=True):
                counts.update(ids)
            pending = []
    for ids in tokenizer.encode_batch(pending, add_special=True):
        counts.update(ids)
    return counts, docs


def trim_tokenizer(tokenizer, documents: list[str], min_count: int = 1):
    """(cut Tokenizer, TrimReport): the tokens `documents` use at least `min_count` times, plus
    specials and byte tokens."""
    from tokenizers import Tokenizer as Backend

    from slmforge.tokenizer import Tokenizer

    counts, _ = count_tokens(tokenizer, documents)
    if not counts:
        raise SlmforgeError("tokenizer trim: the corpus is empty")
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    kind = model.get("type")
    always = set(tokenizer.special_ids) | {t["id"] for t in data.get("added_tokens", [])}
    if model.get("byte_fallback"):
        always |= set(tokenizer.byte_ids)
    if kind == "BPE" and "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
        # Byte-level BPE spells every byte with one of 256 base symbols: keep them all, so any text
        # still encodes (there is no unknown token to fall back to).
        always |= {i for t, i in model["vocab"].items() if len(t) == 1}
    if tokenizer.unk_id is not None:
        always.add(tokenizer.unk_id)
    used = {i for i, n in counts.items() if n >= min_count}
    if kind == "BPE":
        keep, model = _trim_bpe(model, used | always)
    elif kind == "Unigram":
        keep, model = _trim_unigram(model, used | always)
    elif kind == "WordPiece" or kind == "WordLevel":
        keep, model = _trim_vocab_dict(model, used | always)
    else:
        raise SlmforgeError(f"tokenizer trim: a {kind} model cannot be cut (BPE, Unigram, WordPiece, WordLevel can)")
    # Added tokens outside the model's vocabulary (chat markers added for fine-tuning, an HF tokenizer's
    # extras) follow the kept ones, in their order.
    kept = set(keep)
    keep = keep + sorted(t["id"] for t in data.get("added_tokens", []) if t["id"] not in kept)
    new_id = {old: new for new, old in enumerate(keep)}
    data["model"] = model
    for token in data.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_ids(data.get("post_processor"), new_id)
    backend = Backend.from_str(json.dumps(data, ensure_ascii=False))
    meta = {**tokenizer.meta, "trimmed_from": {"vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256}}
    meta.pop("tokenizer_sha256", None)
    cut = Tokenizer(backend, dict(tokenizer.roles), list(tokenizer.sentinels), meta)
    report = TrimReport(tokenizer.vocab_size, cut.vocab_size, sum(counts.values()), keep,
                        covered_tokens=sum(n for i, n in counts.items() if i in new_id))
    _check_encodings(tokenizer, cut, documents, new_id, report)
    return cut, report


def _trim_vocab_dict(model: dict, keep_ids: set[int]) -> tuple[list[int], dict]:
    vocab = model["vocab"]
    kept = sorted((i, t) for t, i in vocab.items() if i in keep_ids)
    model = {**model, "vocab": {t: new for new, (_, t) in enumerate(kept)}}
    return [i for i, _ in kept], model


def _trim_unigram(model: dict, keep_ids: set[int]) -> tuple[list[int], dict]:
    keep = [i for i in range(len(model["vocab"])) if i in keep_ids]
    new_id = {old: new for new, old in enumerate(keep)}
    model = {**model, "vocab": [model["vocab"][i] for i in keep]}
    if model.get("unk_id") is not None:
        model["unk_id"] = new_id[model["unk_id"]]
    return keep, model


def _trim_bpe(model: dict, keep_ids: set[int]) -> tuple[list[int], dict]:
    vocab = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    made_from: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:  # a token may be made by several merges; whichever BPE applies must survive
        made_from.setdefault(a + b, []).append((a, b))
    keep_tokens = {by_id[i] for i in keep_ids if i in by_id}
    stack = list(keep_tokens)
    while stack:  # everything a kept token is merged from is kept too
        for pair in made_from.get(stack.pop(), ()):
            for part in pair:
                if part not in keep_tokens and part in vocab:
                    keep_tokens.add(part)
                    stack.append(part)
    kept = sorted((vocab[t], t) for t in keep_tokens)
    new_vocab = {t: new for new, (_, t) in enumerate(kept)}
    new_merges = [[a, b] for a, b in merges if a in new_vocab and b in new_vocab and a + b in new_vocab]
    return [i for i, _ in kept], {**model, "vocab": new_vocab, "merges": new_merges}


def _renumber_ids(processor, new_id: dict[int, int]) -> None:
    """Token ids inside a post-processor (TemplateProcessing's special_tokens, RoBERTa's cls/sep)."""
    if not isinstance(processor, dict):
        return
    for key in ("cls", "sep"):
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key][1] = new_id[processor[key][1]]
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special.get("ids", [])]
    for inner in processor.get("processors") or []:
        _renumber_ids(inner, new_id)


def _check_encodings(full, cut, documents: list[str], new_id: dict[int, int], report: TrimReport) -> None:
    """Encode the corpus with both: count documents segmented differently, unknowns and bytes."""
    byte_ids = set(cut.byte_ids)
    for start in range(0, len(documents), 1000):
        chunk = documents[start:start + 1000]
        for before, after in zip(full.encode_batch(chunk, add_special=True), cut.encode_batch(chunk, add_special=True)):
            if [new_id.get(i, -1) for i in before] != after:
                report.changed_documents += 1
            report.unk_after += sum(1 for i in after if i == cut.unk_id)
            report.byte_tokens_after += sum(1 for i in after if i in byte_ids)
