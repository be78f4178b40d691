"""Writing checkpoints: self-describing step folders inside a run folder (reading them: `slmforge.runs`).

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
from safetensors.torch import save_file
from torch import nn

import slmforge
from slmforge.errors import SlmforgeError
from slmforge.fileio import write_text_atomic
from slmforge.runs import META, STATE, WEIGHTS, unwrap


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


def load_state(step_dir: Path) -> dict[str, Any]:
    path = step_dir / STATE
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing; this checkpoint holds weights only and cannot resume training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign pickles
        raise SlmforgeError(f"{path}: corrupt trainer state ({type(e).__name__}: {e})") from None


