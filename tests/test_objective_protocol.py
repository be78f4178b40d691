"""The objective protocol declares every hook the training code calls, and every objective has them:
no probing with hasattr."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from slmforge.objectives.base import Objective, TrainingHooks

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slmforge"
CALLERS = ["train/trainer.py", "train/parallel.py", "objectives/base.py"]


def called_on_objectives() -> set[str]:
    """Attributes read from `objective` / `self.objective` in the training code."""
    names = set()
    for relative in CALLERS:
        for node in ast.walk(ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "objective") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "objective"):
                    names.add(node.attr)
    return names


def declared() -> set[str]:
    return set(Objective.__annotations__) | {name for name in vars(Objective) if not name.startswith("_")}


def test_every_hook_the_trainer_calls_is_declared():
    called = called_on_objectives()
    assert {"loss", "collate", "use_head_loss", "set_progress", "trainable_module"} <= called  # the scan works
    assert called <= declared(), called - declared()


def test_the_training_code_probes_no_objective_with_hasattr():
    for relative in CALLERS:
        text = (PACKAGE / relative).read_text(encoding="utf-8")
        assert not re.search(r"(hasattr|getattr)\((self\.)?objective\b", text), relative


def test_every_objective_has_every_declared_hook():
    from slmforge.distill.objective import Distillation
    from slmforge.objectives.classify import Classification
    from slmforge.objectives.clm import CausalLM
    from slmforge.objectives.mlm import MaskedLM
    from slmforge.objectives.seq2seq import Seq2Seq
    from slmforge.objectives.span import SpanCorruption

    for cls in (CausalLM, MaskedLM, SpanCorruption, Seq2Seq, Classification, Distillation):
        assert issubclass(cls, TrainingHooks), cls
        for name in declared():
            assert hasattr(cls, name) or name in getattr(cls, "__annotations__", {}) or name in (
                "name", "kinds", "metric_names", "bits_per_byte"), (cls, name)
