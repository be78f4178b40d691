"""Writes that a crash cannot tear: a temporary file, fsync, then an atomic rename over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_files_atomic(folder: str | Path, texts: dict[str, str], field: str) -> None:
    """Several files of one set into `folder`: each under a temporary name (fsynced), then renamed in
    the order given, so a failure leaves the old set or none, and the last one (a report) marks a
    complete set. `field` names the folder's option in the error for a file in its place."""
    from slmforge.errors import SlmforgeError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SlmforgeError(f"{field}: {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    temporary = {}
    try:
        for name, text in texts.items():
            tmp = folder / f".{name}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            temporary[name] = tmp
    except BaseException:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in temporary.items():
        os.replace(tmp, folder / name)


def read_json(path: str | Path, hint: str = "") -> Any:
    """Parsed JSON of `path`; a file that is not UTF-8 JSON is one SlmforgeError naming it (plus
    `hint`, e.g. what to do about it). A missing file raises FileNotFoundError for the caller to word."""
    from slmforge.errors import SlmforgeError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise SlmforgeError(f"{path}: corrupt JSON ({reason}){hint}") from None


def relative_to(path: str | Path, base: str | Path) -> str:
    """`path` as a path relative to folder `base` (both resolved), for files that name other files:
    what they record then works from any working directory and survives moving both together. An
    absolute path where no relative one exists (another drive on Windows)."""
    target, start = Path(path).resolve(), Path(base).resolve()
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:
        return str(target)


def make_readable(path: str | Path) -> None:
    """Give a file the permissions `open()` would (0666 minus the umask). safetensors writes its files
    0600, which makes a run or export folder unreadable to the rest of a group or a serving process."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask(0) would briefly affect other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def inside(folder: str | Path, name: Any, what: str, subfolders: bool = False) -> Path:
    """`folder / name` for a file name read from a file (a manifest, a progress file, a checksums
    list, `latest`), refused in one line unless it is a plain name in `folder` (with `subfolders`,
    a relative path below it): those files are input, and a `../../x` or `/etc/x` written into one
    must never make a verb read or write outside its folder."""
    from pathlib import PurePosixPath, PureWindowsPath

    from slmforge.errors import SlmforgeError

    text = name if isinstance(name, str) else ""
    parts = PurePosixPath(text).parts
    if (not text or "\\" in text or "\0" in text or PurePosixPath(text).is_absolute()
            or PureWindowsPath(text).drive or any(part in (".", "..") for part in text.split("/"))
            or (len(parts) != 1 and not subfolders)):
        raise SlmforgeError(f"{folder}: {what} {name!r} is not a file name inside this folder; refusing it")
    return Path(folder) / text
