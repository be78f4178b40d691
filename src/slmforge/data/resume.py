"""Resuming `data prepare`: the progress file and the checks that keep a resumed run honest.

`progress.json` in the output folder holds everything needed to continue exactly: the run's identity
(config and tokenizer hash), the input files' sizes and times, each source's read position and skip
counts, the interleaver's draw count, per-source drawn totals and each shard writer's state. It is
rewritten atomically after every batch that completes a shard (and at least once a minute), after the
shard bytes it describes are on disk; it is deleted once `manifest.json` is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from slmforge.data.shards import MANIFEST
from slmforge.errors import SlmforgeError
from slmforge.fileio import read_json, write_json_atomic

PROGRESS = "progress.json"


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of what determines the output bytes (config without out/workers, tokenizer)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "; delete the folder to start over")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    fields = [k for k in sorted(set(old["config"]) | set(new["config"]))
              if old["config"].get(k) != new["config"].get(k)]
    if old.get("tokenizer_sha256") != new.get("tokenizer_sha256"):
        fields.append("tokenizer")
    return ", ".join(fields) or "settings"


def open_output(out: Path, identity: dict[str, Any]
                ) -> tuple[Literal["fresh", "resume", "done"], dict[str, Any] | None]:
    """Decide what to do with the output folder: start, resume from its progress file, or nothing.

    Refuses (one line) a folder prepared or half-prepared with a different config or tokenizer, and
    a non-empty folder that is not a slmforge data folder.
    """
    key = fingerprint(identity)
    manifest_path, progress_path = out / MANIFEST, out / PROGRESS
    if manifest_path.is_file():
        manifest = _read_json(manifest_path)
        if manifest.get("config_sha256") == key:
            progress_path.unlink(missing_ok=True)  # a crash between manifest and cleanup
            return "done", None
        old = {"config": manifest.get("config", {}),
               "tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256")}
        raise SlmforgeError(f"{out}: already holds data prepared with different "
                            f"{_differences(old, identity)}; choose another out folder or delete this one")
    if progress_path.is_file():
        progress = _read_json(progress_path)
        if not progress.get("documents"):
            # Stopped before any document was written (e.g. an empty or bad source, since fixed):
            # nothing to keep, and the inputs may have changed since; start afresh.
            for stale in out.glob("*-[0-9][0-9][0-9][0-9][0-9].bin"):
                stale.unlink()
            progress_path.unlink()
            return "fresh", None
        if progress.get("fingerprint") != key:
            raise SlmforgeError(f"{out}: holds an interrupted run with different "
                                f"{_differences(progress['identity'], identity)}; rerun it with the same "
                                "settings to resume, or choose another out folder")
        return "resume", progress
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlmforgeError(f"{out}: exists and is not an empty folder or a slmforge data folder; "
                            "choose another out folder")
    return "fresh", None


def input_files(readers: list[Any]) -> list[list[dict[str, Any]]]:
    """Each source's files with size and modification time, to notice edits between runs."""
    return [[{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
             for p in reader.files] for reader in readers]


def check_inputs(out: Path, saved: list[list[dict[str, Any]]], current: list[list[dict[str, Any]]]) -> None:
    if saved == current:
        return
    for old, new in zip(saved, current):
        for a, b in zip(old, new):
            if a != b:
                raise SlmforgeError(f"{b['path']}: changed since the interrupted run in {out} "
                                    "(size or time); delete that folder to start over")
    raise SlmforgeError(f"{out}: the input files changed since the interrupted run (files added or "
                        "removed); delete that folder to start over")


def save_progress(out: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(out / PROGRESS, payload)
