"""slmforge: from raw text in any language to a trained, evaluated small language model."""

__version__ = "0.1.0"
