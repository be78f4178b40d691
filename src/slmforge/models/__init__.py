"""Model families (decoders, encoders, encoder-decoders) behind one registry, their configs, presets and building blocks."""

from slmforge.models.decoder import Decoder
from slmforge.models.decoder_config import DecoderConfig
from slmforge.models.encdec import EncoderDecoder
from slmforge.models.encdec_config import EncDecConfig
from slmforge.models.encoder import Encoder
from slmforge.models.encoder_config import EncoderConfig
from slmforge.models.layers import KVCache
from slmforge.models.presets import PRESETS
from slmforge.models.registry import FAMILIES, ModelConfig, build_model, config_from_dict, family

__all__ = ["DecoderConfig", "EncoderConfig", "EncDecConfig", "ModelConfig", "Decoder", "Encoder", "EncoderDecoder",
           "build_model", "KVCache",
           "PRESETS", "FAMILIES", "family", "config_from_dict"]
