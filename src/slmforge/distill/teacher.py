"""The teacher: a model of any family slmforge supports, from a run folder or a Hugging Face folder,
frozen, and the map from the student's vocabulary to the teacher's.

Distillation compares the two models' distributions token by token, so both must read the same
token sequence: every student token must be a teacher token (the same string). A student whose
vocabulary is the teacher's, or a subset of it (a vocabulary trimmed to the target language), maps
one to one; its ids are translated to the teacher's before the teacher reads them, and the teacher's
distribution is renormalized over the student's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmforge.errors import SlmforgeError
from slmforge.formatting import say


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: object
    source: str
    to_teacher: torch.Tensor
    """(student vocabulary,) teacher id of each student id."""
    identity: bool
    """The vocabularies are the same (no translation, no renormalization needed)."""


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder (config.json beside the weights), not an slmforge run."""
    return (folder / "config.json").is_file() and not (folder / "checkpoints").is_dir()


def load_model_and_tokenizer(path: str | Path):
    """(model, tokenizer) of a Hugging Face model folder or an slmforge run or checkpoint folder."""
    from slmforge.tokenizer import load_tokenizer

    folder = Path(path)
    if is_hf_folder(folder):
        from slmforge.interop.export import read_json
        from slmforge.interop.import_hf import load_hf_weights
        from slmforge.models.hf import config_from_hf, is_multimodal

        hf = read_json(folder / "config.json")
        model = load_hf_weights(folder, config_from_hf(hf, where=str(folder / "config.json")), is_multimodal(hf))
        return model, load_tokenizer(folder)
    from slmforge.checkpoint.reading import find_tokenizer_dir, load_model

    model, _, _ = load_model(folder)
    return model, load_tokenizer(find_tokenizer_dir(folder))


def load_teacher(path: str, device: torch.device, dtype: str, student_tokenizer) -> Teacher:
    model, tokenizer = load_model_and_tokenizer(path)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    to_teacher, identity = vocabulary_map(student_tokenizer, tokenizer, path)
    # A teacher with more embedding rows than tokenizer ids (padded, as many HF checkpoints are) scores
    # the extra rows too: select the student's tokens from it like from a larger vocabulary.
    identity = identity and model.cfg.vocab_size == len(to_teacher)
    if not identity:
        say(f"teacher {path}: its vocabulary of {tokenizer.vocab_size:,} holds all {len(to_teacher):,} student "
            f"tokens; its distribution is renormalized over them")
    return Teacher(model, tokenizer, str(path), to_teacher.to(device), identity)


def vocabulary_map(student, teacher, where: str) -> tuple[torch.Tensor, bool]:
    """(student id -> teacher id, whether the vocabularies are identical)."""
    student_vocab = student.backend.get_vocab(with_added_tokens=True)
    teacher_vocab = teacher.backend.get_vocab(with_added_tokens=True)
    if student_vocab == teacher_vocab:
        return torch.arange(student.vocab_size), True
    # Special tokens are matched by role ([CLS] and <s> both start a sequence), the rest by string.
    by_role = {student_vocab[tok]: teacher_vocab[teacher.roles[role]] for role, tok in student.roles.items()
               if tok is not None and teacher.roles.get(role) is not None}
    mapping, missing = [], []
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if index in by_role:
            mapping.append(by_role[index])
        elif token in teacher_vocab:
            mapping.append(teacher_vocab[token])
        else:
            missing.append(token)
            mapping.append(0)
    if missing:
        share = len(missing) / max(len(student_vocab), 1)
        raise SlmforgeError(f"distill.teacher: {len(missing):,} of the student's {len(student_vocab):,} tokens "
                            f"({share:.0%}, e.g. {missing[0]!r}) are not in the teacher {where}'s vocabulary, so "
                            f"their distributions cannot be compared; train the student on a vocabulary cut "
                            f"from the teacher's (its tokenizer, or a trimmed copy of it)")
    if len(mapping) != student.vocab_size:
        raise SlmforgeError(f"distill.teacher: the student's token ids are not contiguous ({len(mapping)} tokens, "
                            f"ids up to {student.vocab_size - 1})")
    return torch.tensor(mapping, dtype=torch.long), False
