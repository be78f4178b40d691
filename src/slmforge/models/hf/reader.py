"""Reading a transformers config.json: its fields with the class's defaults, refusals in one line."""

from __future__ import annotations

from typing import Any

from slmforge.config import validate as validate_config
from slmforge.errors import ConfigError, SlmforgeError


class ConfigReader:
    """Reads config.json fields with transformers' defaults; refusals name the file and the field."""

    def __init__(self, data: dict[str, Any], defaults: dict[str, Any], where: str):
        self.data, self.defaults, self.where = data, defaults, where

    def __call__(self, key: str) -> Any:
        value = self.optional(key)
        if value is None:
            raise SlmforgeError(f"{self.where}: field {key} is {'null' if key in self.data else 'missing'}")
        return value

    def optional(self, key: str) -> Any:
        """The field, transformers' default when absent, None when absent without a default or null."""
        return self.data[key] if key in self.data else self.defaults.get(key)

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
    """`cfg` validated; a refusal names the config.json field it came from (`hf_names`: our field ->
    theirs) beside ours, so the user can find it in the file they have."""
    try:
        validate_config(cfg, "model")
    except ConfigError as e:
        ours, _, why = str(e).partition(": ")
        theirs = hf_names.get(ours.removeprefix("model."), "")
        raise SlmforgeError(f"{where}: {theirs + ' ' if theirs else ''}({ours}): {why}") from None
    return cfg
