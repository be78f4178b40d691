"""What `classify` and `tag` fine-tunes are measured by.

classify: accuracy, and precision / recall / F1 per label with macro-F1 (their unweighted mean over the
labels that occur among the references or the predictions, as scikit-learn's `average="macro"`).

tag: entity-level precision / recall / F1 as seqeval (and CoNLL's conlleval) define them, with no
seqeval needed: entities are the spans BIO tags make (a B-X starts one; an I-X continues an X entity
and starts one after O or another type, as conlleval reads a stray I-), and a predicted entity counts
only when its type and its first and last word equal a reference entity's. Overall figures are micro
(over all entities), per-type figures per entity type; plus the share of words tagged right.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def classification_report(gold: list[str], predicted: list[str]) -> dict[str, Any]:
    """{"examples", "accuracy", "macro_f1", "per_label": {label: {precision, recall, f1, support}}}."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} references, {len(predicted)} predictions")
    right = Counter(g for g, p in zip(gold, predicted) if g == p)
    gold_counts, predicted_counts = Counter(gold), Counter(predicted)
    labels = sorted(set(gold_counts) | set(predicted_counts))
    per_label = {label: {**_prf(right[label], predicted_counts[label], gold_counts[label]),
                         "support": gold_counts[label]} for label in labels}
    return {"examples": len(gold), "accuracy": sum(right.values()) / len(gold) if gold else 0.0,
            "macro_f1": sum(row["f1"] for row in per_label.values()) / len(labels) if labels else 0.0,
            "per_label": per_label}


def _split(tag: str) -> tuple[str, str]:
    """("B" | "I" | "O", entity type)."""
    if tag == "O" or "-" not in tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if prefix in ("B", "I") else ("O", "")


def entities(tags: Iterable[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO tag sequence, conlleval's reading."""
    found = []
    prev_tag, prev_type, start = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        kind_tag, kind = _split(tag)
        ends = prev_tag != "O" and (kind_tag in ("B", "O") or kind != prev_type)
        if ends:
            found.append((prev_type, start, i - 1))
        if kind_tag == "B" or (kind_tag == "I" and (prev_tag == "O" or kind != prev_type)):
            start = i
        prev_tag, prev_type = kind_tag, kind
    return found


def entity_report(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """{"sentences", "words", "word_accuracy", "precision", "recall", "f1", "entities", "per_type": {type:
    {precision, recall, f1, support}}} over sentences of tags (each pair the same length)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} reference sentences, {len(predicted)} predicted")
    right, gold_counts, predicted_counts = Counter(), Counter(), Counter()
    words = right_words = 0
    for g, p in zip(gold, predicted):
        if len(g) != len(p):
            raise ValueError(f"a sentence of {len(g)} reference tags has {len(p)} predicted tags")
        words += len(g)
        right_words += sum(a == b for a, b in zip(g, p))
        g_entities, p_entities = set(entities(g)), set(entities(p))
        gold_counts.update(kind for kind, _, _ in g_entities)
        predicted_counts.update(kind for kind, _, _ in p_entities)
        right.update(kind for kind, _, _ in g_entities & p_entities)
    kinds = sorted(set(gold_counts) | set(predicted_counts))
    per_type = {kind: {**_prf(right[kind], predicted_counts[kind], gold_counts[kind]), "support": gold_counts[kind]}
                for kind in kinds}
    overall = _prf(sum(right.values()), sum(predicted_counts.values()), sum(gold_counts.values()))
    return {"sentences": len(gold), "words": words, "word_accuracy": right_words / words if words else 0.0,
            **overall, "entities": sum(gold_counts.values()), "per_type": per_type}
