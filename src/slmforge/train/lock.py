"""One writer per run folder: a lock file that the operating system releases when its owner dies.

Two runs writing one folder would interleave metrics.jsonl, overwrite config.toml and race on
checkpoint folders. `run/.lock` is held with flock(2) for the whole run and names its owner (pid,
host, start time); a second run refuses in one line. A killed run (even `kill -9`) leaves no stuck
lock: the kernel drops the flock with the process, and the next run takes it over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from slmforge.errors import SlmforgeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the lock is advisory there
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise SlmforgeError(f"train.out_dir: cannot write to {self.path.parent} ({e.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip()
                handle.close()
                raise SlmforgeError(f"{self.path.parent}: another run is writing to this folder ({_describe(owner)}); "
                                    f"wait for it, stop it, or choose another train.out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays, naming the last owner
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()


def _describe(owner: str) -> str:
    try:
        info = json.loads(owner)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


class NewRunFolder:
    """What a training run adds to its folder, so that a run that fails before its first checkpoint
    (a refused config, bad examples, a missing teacher) takes it away again instead of leaving a
    `.lock` and a `tokenizer/` with nothing to resume.

    Recorded before the run touches the folder. Only what the run created goes: the folder itself and
    any parents it made when they did not exist, else the entries it added (those there before stay).
    Nothing goes once `checkpoints/` exists or metrics.jsonl holds records (steps ran: the curves tell
    what went wrong)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.top: Path | None = None  # the outermost folder that did not exist yet
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.exists() or folder == folder.parent:
                break
            self.top = folder
        self.before = set(os.listdir(self.run_dir)) if self.top is None and self.run_dir.is_dir() else set()

    def unused(self) -> bool:
        metrics = self.run_dir / "metrics.jsonl"
        return (self.run_dir.is_dir() and not (self.run_dir / "checkpoints").exists()
                and not (metrics.is_file() and metrics.stat().st_size > 0))

    def remove_if_unused(self) -> bool:
        """Remove what the run created, unless it wrote a checkpoint or metrics; True if it did."""
        import shutil

        if not self.unused():
            return False
        for entry in self.run_dir.iterdir():
            if entry.name in self.before:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        folder = self.run_dir
        while self.top is not None:  # the folders the run made, innermost first, while empty
            try:
                folder.rmdir()
            except OSError:
                break
            if folder == self.top:
                break
            folder = folder.parent
        return True
