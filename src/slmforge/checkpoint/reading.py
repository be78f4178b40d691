"""A run folder, as every verb opens it: the newest complete checkpoint, its meta, its model of any
family, its tokenizer.

    run/
      config.toml                    # the resolved config the run was started (or last resumed) with
      metrics.jsonl, plots/          # written by training
      tokenizer/                     # the tokenizer the data was made with
      checkpoints/step-000500/       # model.safetensors, meta.json (model config, family, step, ...),
                                     # state.pt (trainer state; absent in weights-only folders);
                                     # FSDP2 runs: sharded/ (torch.distributed.checkpoint) instead of
                                     # model.safetensors, holding the weights and the optimizer state
      checkpoints/latest             # names the newest complete step folder

Any verb that needs a model accepts a run folder, its `checkpoints/` folder or one step folder.
Writing them is writing.py, beside this file (the sharded writer: train/sharded.py).
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from slmforge.checkpoint import safe_dcp
from slmforge.checkpoint.meta import META, CheckpointMeta
from slmforge.errors import SlmforgeError
from slmforge.fileio import inside, read_json, write_json_atomic
from slmforge.formatting import say
from slmforge.models.registry import ModelConfig, build_model, family

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"  # sizes and SHA-256 of the other files, written last
STEP_NAME = re.compile(r"step-[0-9]{1,12}")
SHARDED = "sharded"  # a torch.distributed.checkpoint folder: {"model": ..., "optimizer": ...}, one file per rank


@dataclass
class Run:
    """An opened checkpoint: the model (eval mode), where it came from, and what it was trained with
    (`info`, its meta.json as a checked record; `meta`, the same as a plain dict, is read by the
    inference modules until they use `info` too)."""

    model: nn.Module
    step_dir: Path
    meta: dict[str, Any]
    info: CheckpointMeta = None  # from `meta` when not given

    def __post_init__(self):
        if self.info is None:
            self.info = CheckpointMeta.from_json(self.meta, self.step_dir / META)

    @property
    def kind(self) -> str:
        """"decoder" or "encoder" (what the model can do: generate, or fill masks)."""
        return family(self.model.cfg).kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenizer(self):
        """The run's tokenizer, refused if it is not the one the model was trained with (meta.json
        records its sha256): a swapped vocabulary would decode every id as the wrong text."""
        from slmforge.tokenizer import load_tokenizer

        folder = find_tokenizer_dir(self.step_dir)
        tokenizer = load_tokenizer(folder)
        check_tokenizer(tokenizer.sha256, folder, self.step_dir, self.info)
        return tokenizer

    def data_dir(self) -> Path | None:
        """The prepared data the run trained on (meta.json `data`), or None if it recorded none."""
        return recorded_data_dir(self.step_dir, self.info)


def open_run(path: str | Path, device: torch.device | str = "cpu") -> Run:
    """Build the model a run or checkpoint folder describes and fill in its weights."""
    step_dir = resolve_checkpoint(path)
    require_intact(step_dir)
    info = CheckpointMeta.read(step_dir)
    model = build_model(info.model_config(), device=device, seed=None)
    load_weights(model, step_dir)
    return Run(model.eval(), step_dir, info.to_json(), info)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_sharded_checkpoint(step_dir: Path) -> bool:
    """A step folder written by FSDP2 ranks with torch.distributed.checkpoint (no model.safetensors)."""
    return (step_dir / SHARDED / ".metadata").is_file()


def has_weights(step_dir: Path) -> bool:
    return (step_dir / WEIGHTS).is_file() or is_sharded_checkpoint(step_dir)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its `checkpoints/` folder, or a step folder -> the step folder to load."""
    path = Path(path)
    if has_weights(path):
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            step = latest_step(root)
            if not has_weights(step):
                raise SlmforgeError(f"{latest}: points to {step.name}, which has no {WEIGHTS} or {SHARDED}/")
            return step
    if not path.exists():
        raise SlmforgeError(f"{path}: no such run or checkpoint folder")
    raise SlmforgeError(f"{path}: not a run or checkpoint folder (no {WEIGHTS} and no checkpoints/latest)")


def latest_step(root: Path) -> Path:
    """The step folder `root/latest` names. Only a `step-N` folder of this same `checkpoints/` is
    accepted: `latest` is read from disk, and a `../../other-run/...` or `/elsewhere` in it must not
    send eval's writes or a resume somewhere else."""
    latest = root / "latest"
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SlmforgeError(f"{latest}: cannot read ({type(e).__name__})") from None
    if not STEP_NAME.fullmatch(name):
        raise SlmforgeError(f"{latest}: names {name[:80]!r}, not a step-N folder of {root}; refusing it "
                            f"(delete {latest} to use the newest step folder)")
    return root / name


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


UNVERIFIED = f"{CHECKSUMS} is missing, so its files cannot be verified"


def check_integrity(step_dir: Path) -> str | None:
    """Why a step folder cannot be trusted (a file missing, truncated or changed since it was
    written), or None. A folder without checksums.json is not trusted either (`UNVERIFIED`): every
    writer seals its folders with one, so its absence means a folder from before checksums existed,
    or one whose damage was hidden by deleting the list."""
    listed = step_dir / CHECKSUMS
    if not listed.is_file():
        if is_sharded_checkpoint(step_dir):
            return f"{CHECKSUMS} is missing (a sharded checkpoint gets it last, when every rank has written)"
        missing = [name for name in (WEIGHTS, META) if not (step_dir / name).is_file()]
        return f"{missing[0]} is missing" if missing else UNVERIFIED
    try:
        expected = read_json(listed)
        if not isinstance(expected, dict) or not all(isinstance(w, dict) and {"bytes", "sha256"} <= set(w)
                                                     for w in expected.values()):
            return f"{CHECKSUMS} is damaged"
    except SlmforgeError:
        return f"{CHECKSUMS} is damaged"
    for name, want in expected.items():
        try:
            path = inside(step_dir, name, f"{CHECKSUMS} lists", subfolders=True)
        except SlmforgeError:
            return f"{CHECKSUMS} lists {str(name)[:80]!r}, which is not a file of this folder"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, {want['bytes']:,} were written"
        if file_digest(path)["sha256"] != want["sha256"]:
            return f"{name} changed since it was written (sha256 mismatch)"
    if (step_dir / WEIGHTS).is_file() and (problem := unreadable_weights(step_dir / WEIGHTS)):
        return problem  # checksums that were rewritten to match a damaged file
    if is_sharded_checkpoint(step_dir):  # checksums list what rank 0 saw; .metadata, what every rank wrote
        try:
            missing = missing_shards(step_dir / SHARDED)
        except safe_dcp.UnsafeCheckpoint as e:
            return str(e).split(": ", 1)[-1]
        except SlmforgeError:
            return f"{SHARDED}/.metadata is damaged"
        if missing:
            return f"{SHARDED}/{missing[0]} is missing (written by another rank outside a shared checkpoints folder?)"
    return None


def unreadable_weights(path: Path) -> str | None:
    """Why safetensors cannot open `path` (its header is damaged), or None; reads the header only."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        return f"{path.name} cannot be read ({' '.join(str(e).split())[:120]})"
    return None


def require_intact(step_dir: Path) -> None:
    """Refuse a step folder whose files changed since they were written (checksums.json), naming an
    intact older one of the same run if there is one: eval, generate and export must not quietly use
    flipped bits. A folder without checksums (`UNVERIFIED`) is used with a warning: it was asked for
    by name, and its weights are still checked for names, shapes and finite values when read."""
    problem = check_integrity(step_dir)
    if problem is None:
        return
    run = run_dir_of(step_dir)
    older = next((p for p in step_folders(run) if step_number(p) < step_number(step_dir) and check_integrity(p) is None),
                 None) if step_dir.parent.name == "checkpoints" else None
    hint = f"; {older} is intact" if older is not None else ""
    if problem == UNVERIFIED:
        say(f"warning: {step_dir}: {problem}{hint or ''}; use it only if you trust where it came from")
        return
    raise SlmforgeError(f"{step_dir}: {problem}: the checkpoint is damaged{hint}")


def step_folders(run_dir: Path) -> list[Path]:
    """Complete step folders of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    folders = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith((".partial", ".old"))]
    return sorted(folders, key=step_number, reverse=True)


def step_number(folder: Path) -> int:
    """step-000500 -> 500 (by number: step-1000000 comes after step-999500)."""
    try:
        return int(folder.name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return -1


def newest_good_checkpoint(run_dir: Path, say=None) -> Path | None:
    """The step folder a run resumes from: `latest` if it is intact, else the newest intact one, saying
    why each newer one was passed over (`latest` may even be gone while step folders remain). A folder
    without checksums is passed over for an older verified one, and used (saying so) only when no
    verified one exists."""
    root = Path(run_dir) / "checkpoints"
    named = None
    if (root / "latest").is_file():
        try:
            named = latest_step(root)
        except SlmforgeError as e:
            if say is not None:
                say(f"warning: {e}")
    candidates = ([named] if named is not None else []) + [p for p in step_folders(run_dir) if p != named]
    unverified = None
    for folder in candidates:
        problem = check_integrity(folder) if folder.is_dir() else "it does not exist"
        if problem is None:
            return folder
        if problem == UNVERIFIED and unverified is None:
            unverified = folder
        if say is not None:
            say(f"warning: {folder}: {problem}; trying an older checkpoint")
    if unverified is not None and say is not None:
        say(f"warning: no verified checkpoint; resuming from {unverified}, which has no {CHECKSUMS}")
    return unverified


def read_meta(step_dir: Path) -> dict[str, Any]:
    """A step folder's meta.json as a plain dict (checked; `CheckpointMeta.read` gives the record)."""
    return CheckpointMeta.read(step_dir).to_json()


def model_config_from_meta(meta: dict[str, Any], where: Path) -> ModelConfig:
    """The model config a checkpoint's meta.json records, as its family's config class."""
    return CheckpointMeta.from_json(meta, where / META).model_config()


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Load safetensors into `model`, naming the first missing, unexpected or mis-shaped tensor."""
    unwrap(model).load_state_dict(read_weights(model, step_dir), strict=True)


def read_weights(model: nn.Module, step_dir: Path) -> dict[str, torch.Tensor]:
    """A step folder's tensors, checked against what `model` expects (names, shapes, finite values).
    Shapes are global ones, so a sharded (FSDP2) model is checked like a whole one."""
    tensors = checkpoint_tensors(step_dir)
    where = step_dir / (SHARDED if is_sharded_checkpoint(step_dir) else WEIGHTS)
    check_names_and_shapes(where, {n: t.shape for n, t in tensors.items()},
                           {n: t.shape for n, t in unwrap(model).state_dict().items()})
    for name, tensor in tensors.items():
        # Damaged tensor bodies keep their shape: without this, eval prints a table of nan and
        # generate dies inside torch.multinomial.
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SlmforgeError(f"{where}: tensor {name} has {bad:,} non-finite value(s) (nan or inf); "
                                f"the checkpoint is damaged")
    return tensors


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a step folder as whole tensors by plain names: model.safetensors, or a sharded
    folder read on this one process whatever number of ranks wrote it."""
    if is_sharded_checkpoint(step_dir):
        folder = step_dir / SHARDED
        return read_sharded(folder, "model", sharded_tensors(folder, "model"))
    path = step_dir / WEIGHTS
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise SlmforgeError(f"{path}: cannot read weights ({e})") from None


def check_names_and_shapes(path: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """One line for the first tensor a checkpoint lacks, has in another shape, or has but the model does
    not (name -> shape on both sides; global shapes, so a sharded model is checked like a whole one)."""
    for name, shape in expected.items():
        if name not in stored:
            raise SlmforgeError(f"{path}: missing tensor {name}")
        if tuple(stored[name]) != tuple(shape):
            raise SlmforgeError(f"{path}: tensor {name} has shape {tuple(stored[name])}, "
                                f"the model expects {tuple(shape)}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise SlmforgeError(f"{path}: unexpected tensor {unexpected[0]} (a different architecture?)")


def missing_shards(folder: Path) -> list[str]:
    """Files a torch.distributed.checkpoint folder's .metadata names that are not in the folder (a rank
    whose checkpoints folder was not the shared one wrote its shard elsewhere)."""
    storage = safe_dcp.read_metadata(folder).storage_data or {}
    names = sorted({info.relative_path for info in storage.values()})
    return [name for name in names if not (folder / name).is_file()]


def sharded_tensors(folder: Path, prefix: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name (without `prefix.`) -> (global shape, dtype) of the tensors a torch.distributed.checkpoint
    folder holds under `prefix`, from its .metadata."""
    metadata = safe_dcp.read_metadata(folder)
    return {key[len(prefix) + 1:]: (item.size, item.properties.dtype)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix + ".") and hasattr(item, "properties")}


def read_sharded(folder: Path, prefix: str, wanted: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Whole tensors (name -> (shape, dtype), see `sharded_tensors`) from the `prefix` part of a
    torch.distributed.checkpoint folder, read by this process alone (no process group involved)."""
    from torch.distributed.checkpoint.api import CheckpointException

    target = {prefix: {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in wanted.items()}}
    try:
        with dcp_single_process_quiet():
            safe_dcp.load(target, folder, no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise sharded_read_error(folder, e) from None
    return target[prefix]


@contextmanager
def dcp_single_process_quiet():
    """DCP on one process warns that it assumes one process: it is meant."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def dcp_failure(error: BaseException) -> BaseException:
    """DCP wraps each rank's failure in a CheckpointException; the first wrapped one says what happened."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        inner = next(iter(error.failures.values()))  # (exception, stack summary)
        return inner[0] if isinstance(inner, tuple) else inner
    return error


def sharded_read_error(folder: Path, error: BaseException) -> SlmforgeError:
    cause = dcp_failure(error)
    lines = str(cause).strip().splitlines()
    return SlmforgeError(f"{folder}: cannot read the sharded checkpoint ({type(cause).__name__}: "
                         f"{lines[0] if lines else ''})")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Path, dict[str, Any]]:
    """Build the model a checkpoint describes and fill in its weights. Returns (model in training mode,
    as built; step_dir; meta as a plain dict)."""
    run = open_run(path, device)
    return run.model.train(), run.step_dir, run.meta


def run_dir_of(step_dir: Path) -> Path:
    """The run folder that holds a step folder (…/run/checkpoints/step-N -> …/run)."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def check_tokenizer(sha256: str, folder: Path, step_dir: Path, info: CheckpointMeta) -> None:
    """Refuse a tokenizer other than the one the checkpoint recorded (its sha256 in meta.json)."""
    expected = info.tokenizer_sha256
    if expected and sha256 != expected:
        raise SlmforgeError(f"{folder}: tokenizer sha256 {sha256[:12]} differs from the {expected[:12]} "
                            f"this model was trained with ({step_dir / META}); put the training tokenizer back")


def recorded_data_dir(step_dir: Path, info: CheckpointMeta) -> Path | None:
    """The data folder meta.json names. Training records it relative to the run folder, so a run
    and its data work from any working directory and move together; older runs recorded it relative
    to the folder training ran in, which is tried second."""
    recorded = info.data
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_absolute():
        return path
    from_run = run_dir_of(step_dir) / path
    if (from_run / "manifest.json").is_file() or not (path / "manifest.json").is_file():
        return from_run
    return path


def find_tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer saved with a run: `run/tokenizer/`, found from a run, checkpoint or step folder."""
    path = Path(path)
    step_dir = resolve_checkpoint(path)
    for candidate in (step_dir / "tokenizer", run_dir_of(step_dir) / "tokenizer", path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise SlmforgeError(f"{path}: no tokenizer/ folder with tokenizer.json next to the checkpoint")


def write_eval_report(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Add `rows` to the eval.json at `path` (a checkpoint folder's): one entry per evaluated set, so a
    later `eval --text en=...` replaces the `en` entry and keeps the others."""
    previous = read_json(path, "; delete it to start a new one") if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**(previous if isinstance(previous, dict) else {}), **rows})
