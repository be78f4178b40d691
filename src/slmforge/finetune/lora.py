"""LoRA through `peft` on slmforge models, and how a LoRA run's checkpoints are written and read.

`peft.inject_adapter_in_model` replaces each targeted nn.Linear in place by a LoRA layer (the
original under `.base_layer`, frozen; `lora_A`, `lora_B` trainable). A step folder of a LoRA run holds

    model.safetensors           the merged weights (W + alpha/r * B @ A) under plain names, so eval,
                                generate and export read it like any checkpoint
    adapter_model.safetensors   the adapter alone, in PEFT's format (base_model.model.<module>.lora_A.weight)
    adapter_config.json         peft's LoraConfig

and the base weights are written once, at the start, to run/base/ (a checkpoint folder of its own):
a resume loads the base from there and the adapter from the step folder, so the base stays bitwise
what it was.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from slmforge.checkpoint.reading import check_integrity, read_weights
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
BASE_DIR = "base"


def require_peft():
    try:
        import peft
    except ImportError:
        raise SlmforgeError("LoRA needs `peft`: pip install 'slmforge[lora]' (or set lora.rank = 0 for full "
                            "fine-tuning)") from None
    return peft


def peft_config(cfg: LoraConfig, targets: list[str] | None = None, **fields):
    """peft's LoraConfig for `cfg` (adapters on `targets`, default cfg.target_modules), plus `fields`."""
    return require_peft().LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=list(targets or cfg.target_modules), bias="none", **fields)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Add adapters to the modules `cfg.target_modules` names; everything else is frozen. Returns the
    names of the adapted modules."""
    peft = require_peft()
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in cfg.target_modules if t not in linear_names and not any(
        name.endswith(t) for name, _ in model.named_modules())]
    if unknown:
        raise SlmforgeError(f"lora.target_modules: {unknown[0]!r} names no module of this model; linear "
                            f"layers: {', '.join(sorted(linear_names))}")
    peft.inject_adapter_in_model(peft_config(cfg), model)
    return [name for name, m in model.named_modules() if _is_lora(m)]


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under slmforge module names (`layers.0.attn.q_proj.lora_A.weight`)."""
    peft = require_peft()
    return {name: t.detach().cpu().contiguous() for name, t in peft.get_peft_model_state_dict(model).items()}


@torch.no_grad()
def merged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with each adapter merged in, under the plain names of the model before
    adapters were added: exactly what a fully fine-tuned model's checkpoint holds."""
    deltas = {f"{name}.base_layer.weight": m.get_delta_weight("default")
              for name, m in model.named_modules() if _is_lora(m)}
    merged = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        merged[name.replace(".base_layer.", ".")] = tensor.detach().cpu().contiguous()
    return merged


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under plain names (adapters left out, nothing merged)."""
    return {name.replace(".base_layer.", "."): t.detach().cpu().contiguous()
            for name, t in model.state_dict().items() if ".lora_" not in name}


def adapter_files(model: nn.Module, cfg: LoraConfig, targets: list[str] | None = None,
                  rename=lambda name: name, base_model: str = "") -> dict[str, bytes]:
    """adapter_model.safetensors and adapter_config.json in PEFT's format (`rename` maps module
    names, e.g. to Hugging Face's for an exported adapter)."""
    tensors = {PEFT_PREFIX + rename(name): t for name, t in adapter_tensors(model).items()}
    config = peft_config(cfg, targets)
    config.base_model_name_or_path = base_model or None
    with tempfile.TemporaryDirectory() as tmp:  # peft writes its own file (sets -> lists, version)
        config.save_pretrained(tmp)
        config_bytes = (Path(tmp) / ADAPTER_CONFIG).read_bytes()
    return {ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}), ADAPTER_CONFIG: config_bytes}


def load_adapter(model: nn.Module, step_dir: Path) -> None:
    """Set the adapter of a LoRA-wrapped model from a step folder's adapter_model.safetensors."""
    peft = require_peft()
    path = step_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing; {step_dir} was not written by a LoRA run with this config")
    try:
        saved = load_file(path)
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise SlmforgeError(f"{path}: cannot read the adapter ({e})") from None
    tensors = {name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name: t for name, t in saved.items()}
    expected = adapter_tensors(model)
    for name, tensor in expected.items():
        if name not in tensors:
            raise SlmforgeError(f"{path}: missing adapter tensor {name} (another lora.target_modules?)")
        if tensors[name].shape != tensor.shape:
            raise SlmforgeError(f"{path}: adapter tensor {name} has shape {tuple(tensors[name].shape)}, "
                                f"expected {tuple(tensor.shape)} (another lora.rank?)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SlmforgeError(f"{path}: unexpected adapter tensor {unexpected[0]} (another lora.target_modules?)")
    peft.set_peft_model_state_dict(model, tensors)


class LoraCheckpoints:
    """The Trainer's view of a LoRA run's checkpoints (see the module docstring)."""

    def __init__(self, cfg: LoraConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return merged_tensors(model)

    def extra_files(self, model: nn.Module) -> dict[str, bytes]:
        return adapter_files(model, self.cfg)

    def load(self, model: nn.Module, step_dir: Path) -> None:
        load_base(model, self.run_dir / BASE_DIR)
        load_adapter(model, step_dir)


def load_base(model: nn.Module, base_dir: Path) -> None:
    """Load run/base/ (checked: integrity, names, shapes, finite values) into a LoRA-wrapped model's
    base layers; the adapters are left as they are."""
    problem = check_integrity(base_dir) if base_dir.is_dir() else "it does not exist"
    if problem is not None:
        raise SlmforgeError(f"{base_dir}: the LoRA run's base weights cannot be used ({problem})")
    tensors = read_weights(_BaseView(model), base_dir)
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if ".lora_" not in name:
                target.copy_(tensors[name.replace(".base_layer.", ".")])


class _BaseView(nn.Module):
    """What the checked reader in checkpoint/reading.py compares a file against: the base's plain names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = model

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        return base_tensors(self._model)
