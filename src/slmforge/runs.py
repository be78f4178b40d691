"""A run folder, as every verb opens it: the newest complete checkpoint, its meta, its model of any
family, its tokenizer.

    run/
      config.toml                    # the resolved config the run was started (or last resumed) with
      metrics.jsonl, plots/          # written by training
      tokenizer/                     # the tokenizer the data was made with
      checkpoints/step-000500/       # model.safetensors, meta.json (model config, family, step, ...),
                                     # state.pt (trainer state; absent in weights-only folders)
      checkpoints/latest             # names the newest complete step folder

Any verb that needs a model accepts a run folder, its `checkpoints/` folder or one step folder.
Writing checkpoints is training's business (`train/checkpoint.py`); reading them is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from slmforge.errors import ConfigError, SlmforgeError
from slmforge.fileio import read_json
from slmforge.models.registry import ModelConfig, build_model, config_from_dict, family

WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "state.pt"


@dataclass
class Run:
    """An opened checkpoint: the model (eval mode), where it came from, and what it was trained with."""

    model: nn.Module
    step_dir: Path
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        """"decoder" or "encoder" (what the model can do: generate, or fill masks)."""
        return family(self.model.cfg).kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenizer(self):
        from slmforge.tokenizer import load_tokenizer

        return load_tokenizer(find_tokenizer_dir(self.step_dir))


def open_run(path: str | Path, device: torch.device | str = "cpu") -> Run:
    """Build the model a run or checkpoint folder describes and fill in its weights."""
    model, step_dir, meta = load_model(path, device)
    return Run(model.eval(), step_dir, meta)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its `checkpoints/` folder, or a step folder -> the step folder to load."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            step = root / latest.read_text(encoding="utf-8").strip()
            if not (step / WEIGHTS).is_file():
                raise SlmforgeError(f"{latest}: points to {step.name}, which has no {WEIGHTS}")
            return step
    if not path.exists():
        raise SlmforgeError(f"{path}: no such run or checkpoint folder")
    raise SlmforgeError(f"{path}: not a run or checkpoint folder (no {WEIGHTS} and no checkpoints/latest)")


def read_meta(step_dir: Path) -> dict[str, Any]:
    path = step_dir / META
    try:
        return read_json(path)
    except FileNotFoundError:
        raise SlmforgeError(f"{path}: missing; the checkpoint is incomplete") from None


def model_config_from_meta(meta: dict[str, Any], where: Path) -> ModelConfig:
    """The model config a checkpoint's meta.json records, as its family's config class."""
    if not isinstance(meta.get("model"), dict):
        raise SlmforgeError(f"{where / META}: has no model config")
    try:
        return config_from_dict(meta["model"], "model")
    except (ConfigError, SlmforgeError) as e:
        raise SlmforgeError(f"{where / META}: {e}") from None


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Load safetensors into `model`, naming the first missing, unexpected or mis-shaped tensor."""
    path = step_dir / WEIGHTS
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise SlmforgeError(f"{path}: cannot read weights ({e})") from None
    model = unwrap(model)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise SlmforgeError(f"{path}: missing tensor {name}")
        if tensors[name].shape != tensor.shape:
            raise SlmforgeError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                f"the model expects {tuple(tensor.shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise SlmforgeError(f"{path}: unexpected tensor {unexpected[0]} (a different architecture?)")
    model.load_state_dict(tensors, strict=True)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Path, dict[str, Any]]:
    """Build the model a checkpoint describes and fill in its weights. Returns (model, step_dir, meta)."""
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    cfg = model_config_from_meta(meta, step_dir)
    model = build_model(cfg, device=device, seed=None)
    load_weights(model, step_dir)
    return model, step_dir, meta


def run_dir_of(step_dir: Path) -> Path:
    """The run folder that holds a step folder (…/run/checkpoints/step-N -> …/run)."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def find_tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer saved with a run: `run/tokenizer/`, found from a run, checkpoint or step folder."""
    path = Path(path)
    step_dir = resolve_checkpoint(path)
    for candidate in (step_dir / "tokenizer", run_dir_of(step_dir) / "tokenizer", path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise SlmforgeError(f"{path}: no tokenizer/ folder with tokenizer.json next to the checkpoint")
