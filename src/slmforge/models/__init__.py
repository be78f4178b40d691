"""Model configs, presets and the decoder."""

from slmforge.models.config import ModelConfig
from slmforge.models.decoder import Decoder, build_model
from slmforge.models.layers import KVCache
from slmforge.models.presets import PRESETS

__all__ = ["ModelConfig", "Decoder", "build_model", "KVCache", "PRESETS"]
