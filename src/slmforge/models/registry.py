"""Model families behind one registry: family name -> config class, module class, kind, HF adapter.

Everything that builds, loads, exports or imports a model asks this module, so a new kind of model is one
config dataclass, one module, its presets and its HF adapter, plus one entry in `FAMILIES`; a new family
of an existing kind is switches on that kind's config, presets, rows in its adapter and one entry here
(docs/models.md, "Add a family").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slmforge.errors import SlmforgeError
from slmforge.models.decoder import Decoder
from slmforge.models.decoder_config import DecoderConfig
from slmforge.models.encdec import EncoderDecoder
from slmforge.models.encdec_config import EncDecConfig
from slmforge.models.encoder import Encoder
from slmforge.models.encoder_config import EncoderConfig

ModelConfig = DecoderConfig | EncoderConfig | EncDecConfig
"""What a recipe's [model] section holds; its `family` (or its preset's) picks the class."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: Literal["decoder", "encoder", "encoder-decoder"]
    """decoder: causal attention, generates text; encoder: bidirectional, fills masks; encoder-decoder:
    encodes a source, generates a target (span corruption, translation)."""
    config_cls: type
    module_cls: type[nn.Module]
    hf_adapter: str
    """Module holding this family's Hugging Face names (imported lazily: export/import only)."""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "decoder", DecoderConfig, Decoder, "slmforge.models.hf.decoder"),
    "gemma3": Family("gemma3", "decoder", DecoderConfig, Decoder, "slmforge.models.hf.decoder"),
    "qwen3": Family("qwen3", "decoder", DecoderConfig, Decoder, "slmforge.models.hf.decoder"),
    "smollm3": Family("smollm3", "decoder", DecoderConfig, Decoder, "slmforge.models.hf.decoder"),
    "bert": Family("bert", "encoder", EncoderConfig, Encoder, "slmforge.models.hf.encoder"),
    "roberta": Family("roberta", "encoder", EncoderConfig, Encoder, "slmforge.models.hf.encoder"),
    "modernbert": Family("modernbert", "encoder", EncoderConfig, Encoder, "slmforge.models.hf.encoder"),
    "t5": Family("t5", "encoder-decoder", EncDecConfig, EncoderDecoder, "slmforge.models.hf.t5"),
    "encdec": Family("encdec", "encoder-decoder", EncDecConfig, EncoderDecoder, "slmforge.models.hf.t5"),
}


def family(cfg_or_name: Any) -> Family:
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.family
    if name not in FAMILIES:
        raise SlmforgeError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def hf_adapter(cfg_or_name: Any):
    return importlib.import_module(family(cfg_or_name).hf_adapter)


def config_from_dict(data: dict[str, Any], where: str = "model") -> ModelConfig:
    """A [model] table (e.g. meta.json's "model") as the config class its family names."""
    from slmforge import config

    return config.parse(ModelConfig, data, where)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> nn.Module:
    """Assemble in steps: build on the meta device (no memory, no time) -> materialise on `device` ->
    initialise (seeded) or, with seed=None, leave the weights for a checkpoint to fill. Buffers are
    computed either way. Parallel wrappers (DDP, FSDP2) are applied afterwards, from outside.

    device="meta" stops after the first step: FSDP2 shards the meta model, then materialises and
    initialises each rank's shard (train/parallel.py, build_for_strategy)."""
    with torch.device("meta"):
        model = family(cfg).module_cls(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    if seed is None:
        model.reset_buffers()
    else:
        model.init_weights(seed)
    return model


def count_parameters(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact parameter count of any family, from a model built on the meta device."""
    with torch.device("meta"):
        model = family(cfg).module_cls(cfg)
    total = sum(p.numel() for p in model.parameters())
    if not include_embeddings:
        total -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return total
