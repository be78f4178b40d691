"""Where and in what precision to run: the only place that inspects the hardware."""

from __future__ import annotations

import torch

from slmforge.errors import ConfigError


def resolve_device(name: str = "auto", field: str = "train.device") -> torch.device:
    """The device `name` asks for; errors name `field`, the config field or flag it came from."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{field}: {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{field}: {name!r} requested but MPS is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 autocast where the GPU supports it, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name  # bf16 on CPU is honoured (CPU autocast supports it), though usually slower than fp32
