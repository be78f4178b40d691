"""`slmforge trim-vocab`: a model (or tokenizer) cut to the vocabulary a target-language corpus uses.

The embedding rows, the output head and its bias keep the kept tokens' rows, in the cut tokenizer's
order, so the cut model's logits over the kept tokens are the full model's logits for them: its
probabilities are the full model's, renormalized over the kept tokens (tested). Used as a teacher, it
distils over the student's vocabulary directly, and it is smaller: XLM-R's 250,002 x 768 embedding
is 192M of its 278M parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from slmforge.distill.teacher import is_hf_folder, load_model_and_tokenizer
from slmforge.errors import SlmforgeError
from slmforge.fileio import write_json_atomic

# State-dict tensors indexed by token id (first dimension = vocabulary), over all families.
VOCAB_TENSORS = ("embed.weight", "lm_head.weight", "head.bias")


def read_corpus(paths: list[str]) -> list[str]:
    """The documents of `paths`; lines that are not UTF-8 (or empty) are counted and said."""
    from slmforge.formatting import say
    from slmforge.text.sources import documents_of

    documents = list(documents_of(paths, say))
    if not documents:
        raise SlmforgeError(f"{', '.join(paths)}: no text to measure the vocabulary on")
    return documents


def cut_model(model: torch.nn.Module, kept: list[int]):
    """A new model of the same family with only the `kept` token rows (kept[new] = old id)."""
    from slmforge.models import build_model

    cfg = dataclasses.replace(model.cfg, vocab_size=len(kept))
    new_id = {old: new for new, old in enumerate(kept)}
    for name in (f.name for f in dataclasses.fields(cfg)):
        value = getattr(cfg, name)
        if name.endswith("token_id") and isinstance(value, int) and value >= 0:
            if value not in new_id:
                raise SlmforgeError(f"model.{name} = {value} is not a kept token")
            setattr(cfg, name, new_id[value])
    index = torch.tensor(kept, dtype=torch.long)
    state = {name: (t.index_select(0, index) if name in VOCAB_TENSORS else t)
             for name, t in model.state_dict().items()}
    cut = build_model(cfg, device="cpu", seed=None)
    cut.load_state_dict(state, strict=True)
    return cut


def trim_vocab(source: str, texts: list[str], out: str, min_count: int = 1, force: bool = False) -> dict:
    """Write the cut tokenizer (and model, if `source` holds one) to `out`; returns the report."""
    from slmforge.checkpoint.reading import has_weights
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.interop.export import output_dir
    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.trim import trim_tokenizer

    folder = Path(source)
    model = None
    if is_hf_folder(folder) or (folder / "checkpoints").is_dir() or has_weights(folder):
        model, tokenizer = load_model_and_tokenizer(folder)
    else:  # a tokenizer folder alone
        tokenizer = load_tokenizer(folder)
    cut, trimmed = trim_tokenizer(tokenizer, read_corpus(texts), min_count)
    report = {"source": str(source), "texts": list(texts), "min_count": min_count, **trimmed.as_dict()}
    with output_dir(Path(out), force) as tmp:
        if model is None:
            cut.save(tmp)
        else:
            if model.cfg.vocab_size < tokenizer.vocab_size:
                raise SlmforgeError(f"{source}: the model has {model.cfg.vocab_size} embedding rows, the tokenizer "
                                    f"{tokenizer.vocab_size} ids")
            smaller = cut_model(model, trimmed.kept_ids)
            before = sum(p.numel() for p in model.parameters())
            after = sum(p.numel() for p in smaller.parameters())
            report.update({"parameters_before": before, "parameters_after": after})
            cut.save(tmp / "tokenizer")
            save_checkpoint(tmp, 0, smaller, extra_meta={"tokenizer_sha256": cut.sha256, "trimmed_from": report})
        write_json_atomic(tmp / "trim_report.json", report)
    return report
