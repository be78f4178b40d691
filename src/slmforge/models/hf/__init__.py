"""Hugging Face interop: the only package that knows transformers' config fields and weight names.

One adapter module per architecture kind, reached through the model registry:

    decoder.py   Gemma3ForCausalLM, Gemma3ForConditionalGeneration (text part), LlamaForCausalLM,
                 Qwen3ForCausalLM, SmolLM3ForCausalLM
    encoder.py   BertForMaskedLM, XLMRobertaForMaskedLM / RobertaForMaskedLM, ModernBertForMaskedLM, and their
                 *ForSequenceClassification / *ForTokenClassification
    t5.py        T5ForConditionalGeneration (and MT5ForConditionalGeneration, read)

Every adapter offers the same functions on plain dicts and tensors (config.json, safetensors), so
export and import need no `transformers`:

    check_exportable(cfg)                  raise naming the first field transformers cannot express
    config_to_hf(cfg, dtype, *_token_id)   config.json contents
    config_from_hf(hf, where)              our config for a config.json dict (types, values and size
                                           checked; refusals name the config.json field)
    hf_field_names(cfg)                    our field -> the config.json field it comes from
    state_dict_to_hf(cfg, state, dtype)    our tensors under transformers' names
    plan_import(cfg, expected, available, multimodal, where)
                                           {our name: checkpoint name, or (name, start, stop): rows
                                            start:stop of a fused tensor}
"""

from __future__ import annotations

import importlib
from typing import Any

from slmforge.errors import SlmforgeError
from slmforge.models.hf.reader import typed
from slmforge.models.registry import hf_adapter

# architecture / model_type -> adapter module, for config.json files we are asked to import
_ENCODER_ARCHITECTURES = tuple(f"{prefix}For{head}" for prefix in ("Bert", "XLMRoberta", "Roberta", "ModernBert")
                               for head in ("MaskedLM", "SequenceClassification", "TokenClassification"))
_ENCODER_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "modernbert")
_ENCDEC_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
_ENCDEC_MODEL_TYPES = ("t5", "mt5")


def adapter_for_config(hf: dict[str, Any], where: str = "config.json"):
    """The adapter module that reads this config.json (decoder unless it names an encoder or T5)."""
    typed(where, "architectures", hf.get("architectures"), list[str])
    typed(where, "model_type", hf.get("model_type"), str)
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in _ENCDEC_ARCHITECTURES or (arch is None and hf.get("model_type") in _ENCDEC_MODEL_TYPES):
        return importlib.import_module("slmforge.models.hf.t5")
    if arch in _ENCODER_ARCHITECTURES or (arch is None and hf.get("model_type") in _ENCODER_MODEL_TYPES):
        return importlib.import_module("slmforge.models.hf.encoder")
    return importlib.import_module("slmforge.models.hf.decoder")


def config_from_hf(hf: dict[str, Any], where: str = "config.json"):
    return adapter_for_config(hf, where).config_from_hf(hf, where)


def is_multimodal(hf: dict[str, Any]) -> bool:
    adapter = adapter_for_config(hf)
    return bool(getattr(adapter, "is_multimodal", lambda _: False)(hf))


def hf_field_names(cfg) -> dict[str, str]:
    return hf_adapter(cfg).hf_field_names(cfg)


def check_exportable(cfg) -> None:
    hf_adapter(cfg).check_exportable(cfg)


def config_to_hf(cfg, **kwargs) -> dict[str, Any]:
    return hf_adapter(cfg).config_to_hf(cfg, **kwargs)


def state_dict_to_hf(cfg, state_dict, dtype=None):
    return hf_adapter(cfg).state_dict_to_hf(cfg, state_dict, dtype)


def plan_import(cfg, expected, available, multimodal: bool = False, where: str = "checkpoint"):
    return hf_adapter(cfg).plan_import(cfg, expected, available, multimodal, where)


def generation_config(bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None
                      ) -> dict[str, Any]:
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


__all__ = ["SlmforgeError", "adapter_for_config", "config_from_hf", "is_multimodal", "hf_field_names",
           "check_exportable", "config_to_hf", "state_dict_to_hf", "plan_import", "generation_config"]
