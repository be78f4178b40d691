"""Writing checkpoints: self-describing step folders inside a run folder (reading them: reading.py).

    run/checkpoints/step-000500/
        model.safetensors   # weights, plain names (never `_orig_mod.` / `module.` prefixes)
        meta.json           # model config, step, tokens seen, tokenizer hash, slmforge version
        state.pt            # optimizer, schedule, data-loader position, RNG (only when training)
    run/checkpoints/latest  # names the newest complete step folder; written last, atomically

A step folder is written under a temporary name and renamed when complete, so a crash mid-save
never leaves a half checkpoint that `latest` points to, and no checkpoint overwrites another.
"""

from __future__ import annotations

import errno
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
from slmforge.checkpoint.reading import CHECKSUMS, META, STATE, WEIGHTS, file_digest, step_number, unwrap
from slmforge.errors import SlmforgeError
from slmforge.fileio import make_readable, write_text_atomic


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, *, state: dict[str, Any] | None = None,
                    extra_meta: dict[str, Any] | None = None, keep_last: int | None = None,
                    protect: set[str] | frozenset[str] = frozenset(),
                    tensors: dict[str, torch.Tensor] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXX/` and point `latest` at it. Returns the folder.

    `tensors` are the weights when not the model's own state_dict (FSDP2 gathers them first; LoRA
    merges its adapters); `extra_files` are more files of the step folder (LoRA: the adapter)."""
    model = unwrap(model)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    source = tensors if tensors is not None else model.state_dict()
    tensors = {name: t.detach().contiguous().cpu() for name, t in source.items()}
    meta = step_meta(step, model, extra_meta)
    try:
        _write_step_folder(tmp, tensors, meta, state, extra_files or {})
        seal_folder(tmp)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint behind
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) * (3 if state is not None else 1)
        raise write_error(root, final.name, e, needed) from None
    return commit_step_folder(root, tmp, final, keep_last, protect)


def step_meta(step: int, model: nn.Module, extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    """meta.json of a step folder: the step, the model config (what builds the model again), versions."""
    return {"step": step, "model": asdict(unwrap(model).cfg), "slmforge_version": slmforge.__version__,
            **(extra_meta or {})}


def write_error(root: Path, name: str, error: BaseException, needed: int,
                kept: str = "the previous checkpoint is intact") -> SlmforgeError:
    """The one-line error of a failed write into a run folder (a checkpoint; also the tokenizer copy,
    with its own `kept`): a full disk says how much room it needs."""
    free = shutil.disk_usage(root).free
    if _disk_full(error) or free < needed:
        return SlmforgeError(f"{root}: disk full while writing {name} (needs about {needed / 2**20:,.0f} MiB, "
                             f"{free / 2**20:,.0f} MiB free); {kept}: free space and run the same command "
                             f"to resume")
    return SlmforgeError(f"{root}: could not write {name} ({type(error).__name__}: {error}); {kept}")


def commit_step_folder(root: Path, tmp: Path, final: Path, keep_last: int | None = None,
                       protect: set[str] | frozenset[str] = frozenset()) -> Path:
    """Rename a sealed `step-N.partial` to `step-N`, point `latest` at it, prune older step folders."""
    old = None
    if final.exists():  # re-saving a step: move the old copy aside first so `latest` never dangles long
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)  # the rename itself reaches the disk before `latest` names it
    write_text_atomic(root / "latest", final.name + "\n")
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old)
    if keep_last:
        _prune(root, keep_last, protect={final.name, *protect})
    return final


def write_model_folder(folder: Path, model: nn.Module, extra_meta: dict[str, Any]) -> Path:
    """A weights-only checkpoint folder (model.safetensors, meta.json, checksums.json) outside the
    step sequence (e.g. a LoRA run's base), written whole under a temporary name or not at all."""
    model = unwrap(model)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    meta = step_meta(0, model, extra_meta)
    try:
        _write_step_folder(tmp, tensors, meta, None, {})
        seal_folder(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlmforgeError(f"{folder}: could not write ({type(e).__name__}: {e})") from None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    return folder


def _disk_full(error: BaseException) -> bool:
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text


def _write_step_folder(tmp: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       state: dict[str, Any] | None, extra_files: dict[str, bytes]) -> None:
    tmp.mkdir()
    for name, content in extra_files.items():
        (tmp / name).write_bytes(content)
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    make_readable(tmp / WEIGHTS)  # safetensors writes 0600; every other file of the run is 0644
    (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    write_small_files(tmp, meta, state)


def write_small_files(folder: Path, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
    """meta.json, and state.pt when training (the trainer, loader and RNG state)."""
    (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if state is not None:
        torch.save(state, folder / STATE)


def seal_folder(folder: Path) -> None:
    """Write checksums.json last: size and SHA-256 of every file (those of sub-folders too, by relative
    path), checked on resume against flipped bits and truncation; then make it all durable."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    checksums = {path.relative_to(folder).as_posix(): file_digest(path) for path in files}
    (folder / CHECKSUMS).write_text(json.dumps(checksums, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(folder)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale(run_dir: str | Path) -> list[str]:
    """Remove half-written `.partial` / `.old` step folders a crash left behind; returns their names."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name.endswith((".partial", ".old")))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return [p.name for p in stale]


def _prune(root: Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest `keep_last` step folders, never one named in `protect` (the one just
    written, the best by validation loss)."""
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith((".partial", ".old"))),
                   key=step_number)
    for old in steps[:-keep_last]:
        if old.name not in protect:
            shutil.rmtree(old)


def load_state(step_dir: Path) -> dict[str, Any]:
    path = step_dir / STATE
    if not path.is_file():
        raise SlmforgeError(f"{path}: missing; this checkpoint holds weights only and cannot resume training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign pickles
        raise SlmforgeError(f"{path}: corrupt trainer state ({type(e).__name__}: {e})") from None


