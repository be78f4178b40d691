"""`slmforge pretrain`: wire data, model (any family), objective and run folder into the Trainer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slmforge import config as config_io
from slmforge.checkpoint.reading import find_tokenizer_dir, model_config_from_meta, read_meta, run_dir_of
from slmforge.checkpoint.writing import write_error
from slmforge.data.loader import WindowLoader
from slmforge.data.shards import ShardSet, manifest_tokenizer_dir, read_manifest
from slmforge.errors import SlmforgeError
from slmforge.fileio import relative_to
from slmforge.formatting import say
from slmforge.models import family
from slmforge.objectives import DEFAULT_FOR_KIND, ObjectiveConfig, build_objective
from slmforge.train.config import PretrainConfig
from slmforge.train.parallel import barrier
from slmforge.train.resume_check import data_fingerprint, describe_change
from slmforge.train.run import RunParts, TrainingRun
from slmforge.train.session import Session, training_session


def copy_tokenizer(manifest: dict, data_dir: Path, run_dir: Path) -> str | None:
    """Copy the tokenizer the shards were made with into run/tokenizer/; returns its sha256.

    Refuses a tokenizer whose hash is not the one the manifest recorded (e.g. retrained in place after
    `data prepare`): the shards' ids would be decoded with another vocabulary."""
    from slmforge.tokenizer import load_tokenizer

    info = manifest.get("tokenizer") or {}
    if not info.get("path"):
        say(f"warning: {data_dir}/manifest.json names no tokenizer; the run folder will have none")
        return info.get("sha256")
    source = manifest_tokenizer_dir(data_dir, manifest)
    if not (source / "tokenizer.json").is_file():
        raise SlmforgeError(f"{data_dir}/manifest.json: tokenizer folder {source} has no tokenizer.json")
    actual, expected = load_tokenizer(source).sha256, info.get("sha256")
    if expected and actual != expected:
        raise SlmforgeError(f"{source}: tokenizer sha256 {actual[:12]} differs from the {expected[:12]} that "
                            f"{data_dir}/manifest.json recorded (changed or retrained since `data prepare`); "
                            f"prepare the data again with it, or restore the tokenizer the data was made with")
    target = run_dir / "tokenizer"
    if source.resolve() == target.resolve():
        return info.get("sha256")
    if (target / "tokenizer.json").is_file() and load_tokenizer(target).sha256 == actual:
        return info.get("sha256")  # a resumed run's: other ranks may be reading it right now, leave it be
    partial = run_dir / "tokenizer.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    except OSError as e:  # a full disk (copytree reports it as shutil.Error), permissions
        shutil.rmtree(partial, ignore_errors=True)  # never a half-copied tokenizer
        needed = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        raise write_error(run_dir, "tokenizer/", e, needed, kept="nothing half-copied is left") from None
    return info.get("sha256")


def pretrain(cfg: PretrainConfig, extend_objective=None) -> Path:
    """Train per `cfg` (resuming from its run folder when possible); returns the run folder.

    `extend_objective(objective, family, tokenizer, device) -> (objective, meta)` replaces the
    objective once it is built (distillation adds its teacher) and adds to every checkpoint's meta."""
    loop = cfg.train
    if not loop.data:
        raise SlmforgeError("train.data: required; point it at a folder made by `slmforge data prepare`")
    read_manifest(loop.data)  # a wrong train.data fails before anything is created
    with training_session(loop, cfg.parallel) as session:
        return _pretrain(cfg, session, extend_objective)


def _pretrain(cfg: PretrainConfig, session: Session, extend_objective=None) -> Path:
    loop, run_dir, resume_dir, where = cfg.train, session.run_dir, session.resume_dir, session.where
    run = TrainingRun.start(cfg, session)

    train_shards = ShardSet(loop.data, loop.train_split)
    init_dir = run.init_from()
    if init_dir is not None:
        _check_same_tokenizer(init_dir, train_shards.manifest, loop.data)
        # Pretrained embeddings keep their rows: HF checkpoints often pad the vocabulary beyond the
        # tokenizer (Gemma 3: 262,144 rows), which is fine as long as every token id has a row.
        if cfg.model.vocab_size < train_shards.vocab_size:
            raise SlmforgeError(f"train.init_from: the model has {cfg.model.vocab_size} embedding rows but "
                                f"{loop.data} was tokenized with {train_shards.vocab_size} ids")
    elif cfg.model.vocab_size != train_shards.vocab_size:
        say(f"model.vocab_size set to {train_shards.vocab_size} from {loop.data}/manifest.json")
        cfg.model.vocab_size = train_shards.vocab_size
    model_family = family(cfg.model)
    if cfg.objective is None:  # no [objective] section: the model's kind decides
        cfg.objective = config_io.parse(ObjectiveConfig, {"kind": DEFAULT_FOR_KIND[model_family.kind]},
                                        "objective")
    pad_id = train_shards.manifest.get("pad_id")
    if cfg.model.family == "roberta" and not loop.init_from and pad_id is not None and cfg.model.pad_token_id != pad_id:
        # RoBERTa numbers positions from the pad id, so the model must know the tokenizer's.
        say(f"model.pad_token_id set to {pad_id} from {loop.data}/manifest.json")
        cfg.model.pad_token_id = pad_id
    val_shards = None
    if loop.val_split in train_shards.manifest["splits"]:
        val_shards = ShardSet(loop.data, loop.val_split)
        if val_shards.num_tokens <= loop.seq_len:
            say(f"warning: validation split has only {val_shards.num_tokens} tokens; skipping validation")
            val_shards = None

    if resume_dir is not None:
        _check_same_model(resume_dir, cfg)
        _check_same_tokenizer(resume_dir, train_shards.manifest, loop.data)
    if where.is_main:  # one writer: rank 0 prepares the run folder, the others wait for it
        run_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(train_shards.manifest, Path(loop.data), run_dir)
    barrier()
    tokenizer = _run_tokenizer(run_dir)
    objective = build_objective(cfg.objective, model_family.kind, model_family.name, tokenizer,
                                where=f"{loop.data}/manifest.json")
    extra_meta = {}
    if extend_objective is not None:
        objective, extra_meta = extend_objective(objective, model_family, tokenizer, session.device)
    window = objective.window_tokens(loop.seq_len)
    train_loader = WindowLoader(train_shards, loop.seq_len, loop.batch_size, seed=loop.seed, window=window,
                                rank=where.rank, world_size=where.world_size)
    val_batches = None
    if val_shards is not None:
        val_loader = WindowLoader(val_shards, loop.seq_len, loop.eval_batch_size or loop.batch_size,
                                  shuffle=False, training=False, window=window,
                                  rank=where.rank, world_size=where.world_size)
        val_batches = lambda: val_loader.epoch_batches(loop.eval_batches)  # noqa: E731
    model = run.build(weights_from=init_dir)

    n_params = sum(p.numel() for p in model.parameters())
    meta = {"tokenizer_sha256": (train_shards.manifest.get("tokenizer") or {}).get("sha256"),
            "data": relative_to(loop.data, run_dir), "seq_len": loop.seq_len,
            # eval and generate lay out text as training did: with or without bos
            "add_bos": train_shards.manifest.get("bos_id") is not None,
            # eval scores the model with the objective it was trained with
            "objective": config_io.to_dict(cfg.objective), **extra_meta}
    run.fit(RunParts(model=model, objective=objective, train_loader=train_loader, val_batches=val_batches,
                     fingerprint=data_fingerprint(train_shards.manifest), meta=meta,
                     description=f"{cfg.model.family} {n_params / 1e6:.2f}M parameters | {objective.name} | "
                                 f"{train_shards.num_tokens:,} training tokens",
                     val_bytes_per_token=val_shards.bytes_per_token if val_shards else None))
    return run_dir


def _run_tokenizer(run_dir: Path):
    """The tokenizer copied into the run folder (None for data made without one, e.g. synthetic)."""
    from slmforge.tokenizer import load_tokenizer

    folder = run_dir / "tokenizer"
    return load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None


def _check_same_model(step_dir: Path, cfg: PretrainConfig) -> None:
    """The architecture cannot change under a checkpoint's weights: refused in one line naming the
    fields that differ (`model.num_layers 2 -> 3`)."""
    saved = model_config_from_meta(read_meta(step_dir), step_dir)
    if saved != cfg.model:
        shown = describe_change("model", config_io.to_dict(saved), config_io.to_dict(cfg.model))
        raise SlmforgeError(f"{run_dir_of(step_dir)}: its checkpoint was trained with a different [model] config "
                            f"({shown}); undo the change to continue that run, or give the new model "
                            f"another train.out_dir")


def _check_same_tokenizer(step_dir: Path, manifest: dict, data_dir: str) -> None:
    """The data must be tokenized with the tokenizer the checkpoint's embeddings were trained for."""
    from slmforge.tokenizer import load_tokenizer

    try:
        tokenizer_dir = find_tokenizer_dir(step_dir)
    except SlmforgeError:
        return  # a checkpoint without a tokenizer (synthetic data): nothing to compare
    expected = load_tokenizer(tokenizer_dir).sha256  # the hash `data prepare` records
    actual = (manifest.get("tokenizer") or {}).get("sha256")
    if actual and actual != expected:
        raise SlmforgeError(f"{data_dir}: tokenized with a different tokenizer (sha256 {actual[:12]}) than "
                            f"{step_dir} was trained with ({tokenizer_dir}, sha256 {expected[:12]}); "
                            f"prepare the data with that tokenizer")
