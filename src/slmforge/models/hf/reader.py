"""Reading a transformers config.json: its fields with the class's defaults, refusals in one line.

A config.json is input like any other: every field an adapter reads is checked against the type of
the field of ours it fills (taken from our config dataclass, so the checks are the ones a [model]
table in a recipe gets), layer counts against a plausible range before anything loops over layers,
and the model's size is estimated from the config alone before anything is built or allocated.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union, get_args, get_origin

from slmforge import config as config_io
from slmforge.config import validate as validate_config
from slmforge.errors import ConfigError, SlmforgeError

MAX_LAYERS = 1024
"""More blocks than any published model has (Llama 3.1 405B: 126). A larger count is a typo (or a float
such as 1e9), refused before the adapter or the model builder loops over that many layers."""

MAX_PARAMETERS = 10_000_000_000
"""slmforge trains 10M-500M models; import also takes the few-billion models one distills from or
fine-tunes (Llama 3.2 3B, Gemma 3 4B, an 8B teacher). Beyond this, a config.json is refused before
anything is allocated (float32 weights: 4 bytes each)."""

# Our fields that size a model, in the order a size refusal lists them (those the family maps).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_decoder_layers",
               "num_heads", "num_kv_heads", "head_dim", "max_seq_len", "type_vocab_size", "pad_token_id",
               "relative_buckets")


def hf_types(config_cls: type, hf_names: dict[str, str], **extra: Any) -> dict[str, Any]:
    """config.json field -> the type it must have: that of our field it fills (`hf_names`: ours ->
    theirs, from `config_cls`'s annotations), plus `extra` for fields of theirs that fill none directly."""
    hints = typing.get_type_hints(config_cls)
    types_ = {theirs: hints[ours] for ours, theirs in hf_names.items() if "." not in theirs}
    types_.update(extra)
    return types_


def typed(where: str, key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (None passes: absent or null fields are the callers' business); a refusal
    names the file, the field and the value, in one line."""
    if tp is None or value is None:
        return value
    try:
        value = config_io.parse(_required(tp), value, key)
    except ConfigError as e:
        raise SlmforgeError(f"{where}: {e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SlmforgeError(f"{where}: {key}: must be a finite number, got {value!r}")
    return value


def _required(tp: Any) -> Any:
    """`X | None` -> X (None never reaches the check, and "expected float" reads better)."""
    if get_origin(tp) in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


class ConfigReader:
    """Reads config.json fields with transformers' defaults; refusals name the file and the field.

    `types`: config.json field -> its type (see `hf_types`); a field read with a value of another type
    is refused. `layer_fields`: fields holding a number of layers, which must lie in 1..MAX_LAYERS.
    """

    def __init__(self, data: dict[str, Any], defaults: dict[str, Any], where: str,
                 types: dict[str, Any] | None = None, layer_fields: tuple[str, ...] = ()):
        self.data, self.defaults, self.where = data, defaults, where
        self.types, self.layer_fields = types or {}, layer_fields

    def __call__(self, key: str) -> Any:
        value = self.optional(key)
        if value is None:
            raise SlmforgeError(f"{self.where}: field {key} is {'null' if key in self.data else 'missing'}")
        return value

    def optional(self, key: str) -> Any:
        """The field, transformers' default when absent, None when absent without a default or null."""
        return self.checked(key, self.data[key] if key in self.data else self.defaults.get(key))

    def present(self, key: str) -> Any:
        """The field as the file has it (None when absent or null: no default), type-checked."""
        return self.checked(key, self.data.get(key))

    def checked(self, key: str, value: Any) -> Any:
        raw, value = value, typed(self.where, key, value, self.types.get(key))
        if key in self.layer_fields and value is not None and not 1 <= value <= MAX_LAYERS:
            raise SlmforgeError(f"{self.where}: {key}={raw!r}: a number of layers must lie in 1..{MAX_LAYERS} "
                                f"(no published model has more than a few hundred)")
        return value

    def require(self, key: str, allowed: tuple, why: str) -> None:
        value = self.optional(key)
        if value not in allowed:
            raise SlmforgeError(f"{self.where}: {key}={value!r} is not supported; {why}")

    def one_value(self, *keys: str) -> Any:
        """Fields that slmforge keeps as one setting (the dropout rates) must agree."""
        values = [self(key) for key in keys]
        if any(value != values[0] for value in values):
            shown = ", ".join(f"{key}={value}" for key, value in zip(keys, values))
            raise SlmforgeError(f"{self.where}: {shown}: slmforge has one dropout rate for all of these")
        return values[0]

    def reject_truthy(self, key: str, why: str) -> None:
        if self.data.get(key):
            raise SlmforgeError(f"{self.where}: {key}={self.data[key]!r}: {why}")


def checked_config(cfg: Any, where: str, hf_names: dict[str, str]) -> Any:
    """`cfg` type-checked, validated and of an importable size; a refusal names the config.json field
    it came from (`hf_names`: our field -> theirs) beside ours, so the user can find it in the file."""
    hints = typing.get_type_hints(type(cfg))
    try:
        for f in dataclasses.fields(cfg):  # what a recipe's [model] table would be refused for, later
            config_io.parse(hints[f.name], getattr(cfg, f.name), f"model.{f.name}")
        validate_config(cfg, "model")
    except ConfigError as e:
        ours, _, why = str(e).partition(": ")
        theirs = hf_names.get(ours.removeprefix("model."), "")
        raise SlmforgeError(f"{where}: {theirs + ' ' if theirs else ''}({ours}): {why}") from None
    check_size(cfg, where, hf_names)
    return cfg


def check_size(cfg: Any, where: str, hf_names: dict[str, str]) -> None:
    """Refuse a config whose model would exceed MAX_PARAMETERS, saying the estimate and the sizes."""
    count = estimated_parameters(cfg)
    if count > MAX_PARAMETERS:
        raise SlmforgeError(f"{where}: {size_fields(cfg, hf_names)} describe a model of about "
                            f"{describe_count(count)} ({count * 4 / 2**30:,.0f} GiB of float32 weights); "
                            f"slmforge imports models of up to {describe_count(MAX_PARAMETERS)}")


def size_fields(cfg: Any, hf_names: dict[str, str]) -> str:
    """`vocab_size=..., hidden_size=..., ...`: the config.json fields that size the model, as read."""
    return ", ".join(f"{hf_names[ours]}={getattr(cfg, ours)}" for ours in SIZE_FIELDS
                     if ours in hf_names and hasattr(cfg, ours))


def describe_count(count: int) -> str:
    return f"{count / 1e9:,.1f} billion parameters" if count >= 1e8 else f"{count:,} parameters"


def estimated_parameters(cfg: Any) -> int:
    """About the parameter count of the model `cfg` describes, from its sizes alone: nothing is built,
    so any size (even one whose tensors would overflow a storage size) is safe to ask about."""
    from slmforge.models.decoder_config import DecoderConfig
    from slmforge.models.encoder_config import EncoderConfig

    if isinstance(cfg, DecoderConfig):
        return cfg.num_parameters()
    d, f, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    if isinstance(cfg, EncoderConfig):
        mlp = (3 if cfg.family == "modernbert" else 2) * d * f  # ModernBERT's Wi is gated (2f rows)
        tables = (vocab + cfg.position_rows + cfg.type_vocab_size) * d
        return cfg.num_layers * (4 * d * d + mlp) + tables + d * d + vocab
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # EncDecConfig
    mlp = 3 * d * f
    return (cfg.num_layers * (attn + mlp) + cfg.num_decoder_layers * (2 * attn + mlp)
            + vocab * d * (1 if cfg.tie_embeddings else 2) + 2 * cfg.relative_buckets * cfg.num_heads)
