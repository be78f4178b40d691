"""Objectives: each turns raw token windows into model inputs and targets and computes the loss.

Pretraining (CLM, MLM, span corruption), distillation and fine-tuning are the same trainer with
another objective. A recipe picks one in its [objective] section by `kind`.
"""

from __future__ import annotations

from slmforge.errors import SlmforgeError
from slmforge.objectives.base import Objective, mean_loss, sample_generator, summarize
from slmforge.objectives.clm import CausalLM, ClmConfig
from slmforge.objectives.mlm import MaskedLM, MlmConfig
from slmforge.objectives.seq2seq import Seq2Seq
from slmforge.objectives.span import SpanConfig, SpanCorruption

ObjectiveConfig = ClmConfig | MlmConfig | SpanConfig
"""What a recipe's [objective] section holds; `kind` picks the class. (Seq2Seq, translation pairs for
encoder-decoders, has no section: `slmforge finetune` with finetune.task = "translate" uses it.)"""

DEFAULT_FOR_KIND = {"decoder": "clm", "encoder": "mlm", "encoder-decoder": "span"}


def build_objective(cfg: ObjectiveConfig, model_kind: str, family_name: str, tokenizer=None,
                    where: str = "tokenizer") -> Objective:
    """The objective `cfg` describes, checked against the model it will train."""
    cls = MaskedLM if isinstance(cfg, MlmConfig) else SpanCorruption if isinstance(cfg, SpanConfig) else CausalLM
    if model_kind not in cls.kinds:
        article = "an" if model_kind[0] in "aeiou" else "a"
        raise SlmforgeError(f"objective.kind: {cfg.kind!r} cannot train model family {family_name!r} "
                            f"({article} {model_kind}); use objective.kind = \"{DEFAULT_FOR_KIND[model_kind]}\"")
    if cls is MaskedLM:
        return MaskedLM.for_tokenizer(cfg, tokenizer, where)
    if cls is SpanCorruption:
        return SpanCorruption.for_tokenizer(cfg, tokenizer, model_kind, where)
    return CausalLM.for_tokenizer(cfg, tokenizer, where)


__all__ = ["Objective", "ObjectiveConfig", "ClmConfig", "MlmConfig", "SpanConfig", "CausalLM", "MaskedLM",
           "SpanCorruption", "Seq2Seq", "build_objective",
           "sample_generator", "mean_loss", "summarize", "DEFAULT_FOR_KIND"]
