"""Checkpoints: self-describing step folders inside a run folder.

    run/checkpoints/step-000500/
        model.safetensors   # weights, plain names (never `_orig_mod.` / `module.` prefixes)
        meta.json           # model config, step, tokens seen, tokenizer hash, slmforge version
        state.pt            # optimizer, schedule, data-loader position, RNG (only when training)
    run/checkpoints/latest  # names the newest complete step folder; written last, atomically

A step folder is written under a temporary name and renamed when complete, so a crash mid-save
never leaves a half checkpoint that `latest` points to, and no checkpoint overwrites another.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import slmforge
from slmforge.errors import SlmforgeError
from slmforge.fileio import read_json, write_text_atomic
from slmforge.models import Decoder, ModelConfig, build_model

WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, *, state: dict[str, Any] | None = None,
                    extra_meta: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXX/` and point `latest` at it. Returns the folder."""
    model = unwrap(model)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    meta = {"step": step, "model": asdict(model.cfg), "slmforge_version": slmforge.__version__,
            **(extra_meta or {})}
    (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if state is not None:
        torch.save(state, tmp / STATE)
    _fsync_tree(tmp)
    old = None
    if final.exists():  # re-saving a step: move the old copy aside first so `latest` never dangles long
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    if old is not None:
        shutil.rmtree(old)
    if keep_last:
        _prune(root, keep_last, protect=final.name)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _prune(root: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith((".partial", ".old")))
    for old in steps[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old)


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
    from slmforge import config

    try:
        return config.from_dict(ModelConfig, meta["model"], "model")
    except KeyError:
        raise SlmforgeError(f"{where / META}: has no model config") from None
    except SlmforgeError as e:
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


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Decoder, Path, dict[str, Any]]:
    """Build the model a checkpoint describes and fill in its weights. Returns (model, step_dir, meta)."""
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    cfg = model_config_from_meta(meta, step_dir)
    model = build_model(cfg, device=device, seed=None)
    load_weights(model, step_dir)
    return model, step_dir, meta


def load_state(step_dir: Path) -> dict[str, Any]:
    path = step_dir / STATE
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing; this checkpoint holds weights only and cannot resume training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign pickles
        raise SlmforgeError(f"{path}: corrupt trainer state ({type(e).__name__}: {e})") from None


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
