"""What a resumed run may change, and what it must not silently.

A checkpoint records the resolved config it was trained with and a fingerprint of its data. On
resume the new config is compared with it:

- changes that break exactness (the data, seed, sequence length, global batch, objective) are
  refused in one line naming the fields, unless `train.allow_config_changes = true`;
- optimizer settings (betas, eps, weight decay) are applied to the restored optimizer, never ignored;
- the learning rate, its schedule and gradient clipping take effect from the next step, each change said;
- everything else (max_steps to continue longer, eval and save cadence, logging) just takes effect.

Every start appends the config it ran with to `config_history.jsonl`, so config.toml (the newest)
never hides what an earlier part of the run used.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from slmforge.errors import SlmforgeError

# Dotted fields whose change would make the resumed run differ from one trained straight through.
EXACTNESS_FIELDS = ("train.seed", "train.seq_len", "train.global_batch", "train.global_micro_batch", "objective",
                    "train.train_split", "data_fingerprint", "finetune.packing", "lora")


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 of what the data is (its splits' shards, counts, vocabulary, tokenizer), not where it is:
    the same data under another path has the same fingerprint."""
    identity = {
        "vocab_size": manifest.get("vocab_size"), "dtype": manifest.get("dtype"),
        "tokenizer": (manifest.get("tokenizer") or {}).get("sha256"),
        "splits": {name: [(s.get("name"), s.get("tokens"), s.get("documents")) for s in split.get("shards", [])]
                   for name, split in sorted(manifest.get("splits", {}).items())},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def resume_identity(config: dict[str, Any], world_size: int, fingerprint: str) -> dict[str, Any]:
    """The values EXACTNESS_FIELDS name, from a resolved config dict."""
    train = config.get("train", {})
    return {
        "train.seed": train.get("seed"), "train.seq_len": train.get("seq_len"),
        "train.global_batch": train.get("batch_size", 0) * train.get("grad_accum", 1) * world_size,
        # epochs roll over per global micro-batch, so its size matters too
        "train.global_micro_batch": train.get("batch_size", 0) * world_size,
        "objective": config.get("objective"), "train.train_split": train.get("train_split"),
        "data_fingerprint": fingerprint,
    }


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], where: Path, allow: bool, say) -> None:
    """Refuse (or, with allow, report) changes to what exactness depends on; `saved` is None for
    checkpoints written before it was recorded."""
    if not saved:
        return
    changed = [name for name in EXACTNESS_FIELDS if name in saved and saved[name] != current.get(name)]
    if not changed:
        return
    shown = ", ".join(describe_change(name, saved[name], current.get(name)) for name in changed)
    if not allow:
        raise SlmforgeError(f"{where}: resuming with changes that make the run differ from an uninterrupted one "
                            f"({shown}); undo them, start a new train.out_dir, or set "
                            f"train.allow_config_changes=true")
    say(f"warning: resuming with changed {shown} (train.allow_config_changes=true)")


def apply_optimizer_settings(optimizer, optim_cfg, say) -> None:
    """Put the config's betas / eps / weight decay (and Muon's momentum / weight decay) into a restored
    optimizer (its saved groups would otherwise win silently), group by group as build_optimizer makes
    them (optim.group_settings, which also refuses a checkpoint of the other optim.kind)."""
    from slmforge.train.optim import group_settings

    changes = []
    for group, wanted, prefix in group_settings(optimizer, optim_cfg):
        for key, value in wanted.items():
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value:
                changes.append(f"{prefix}{key} {current} -> {value}")
                group[key] = value
    if changes:
        say(f"optimizer settings changed since the checkpoint, applied: {', '.join(sorted(set(changes)))}")


# Dotted fields of the schedule a resumed run follows from its next step on (each change is said).
SCHEDULE_FIELDS = ("optim.lr", "schedule.decay", "schedule.warmup_steps", "schedule.min_lr_ratio",
                   "train.clip_grad", "optim.muon_lr", "schedule.cooldown_ratio", "schedule.cooldown_shape",
                   "optim.decay_embeddings", "optim.lr_width_base", "train.batch_warmup_steps",
                   "train.batch_warmup_start")


def schedule_settings(optim_cfg, schedule, loop) -> dict[str, Any]:
    """The values SCHEDULE_FIELDS name, from the config sections a Trainer holds."""
    return {"optim.lr": optim_cfg.lr, "schedule.decay": schedule.decay, "schedule.warmup_steps": schedule.warmup_steps,
            "schedule.min_lr_ratio": schedule.min_lr_ratio, "train.clip_grad": loop.clip_grad,
            "optim.muon_lr": optim_cfg.muon_lr, "schedule.cooldown_ratio": schedule.cooldown_ratio,
            "schedule.cooldown_shape": schedule.cooldown_shape, "optim.decay_embeddings": optim_cfg.decay_embeddings,
            "optim.lr_width_base": optim_cfg.lr_width_base, "train.batch_warmup_steps": loop.batch_warmup_steps,
            "train.batch_warmup_start": loop.batch_warmup_start}


def announce_schedule_changes(saved_config: dict[str, Any] | None, current: dict[str, Any], say) -> None:
    """Say which of SCHEDULE_FIELDS differ from the resolved config a checkpoint was written with
    (`saved_config`, its meta.json's "config"; None for checkpoints without one): they are applied."""
    if not isinstance(saved_config, dict):
        return
    changes = []
    for name in SCHEDULE_FIELDS:
        section, key = name.split(".")
        table = saved_config.get(section)
        if not isinstance(table, dict) or key not in table:
            continue  # not recorded: nothing to compare with
        if table[key] != current[name]:
            changes.append(describe_change(name, table[key], current[name]))
    if changes:
        say(f"schedule settings changed since the checkpoint, applied: {', '.join(changes)}")


def append_history(run_dir: Path, config: dict[str, Any], resumed_from: int) -> None:
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from_step": resumed_from, "config": config}
    with open(run_dir / "config_history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:12] + "..."


def describe_change(name: str, before: Any, after: Any) -> str:
    """`name old -> new`; for two tables, only the fields that differ (`lora.rank 0 -> 4`)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return ", ".join(f"{name}.{k} {_short(before.get(k))} -> {_short(after.get(k))}" for k in keys)
    return f"{name} {_short(before)} -> {_short(after)}"
