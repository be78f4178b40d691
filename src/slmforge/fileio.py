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


def read_json(path: str | Path, hint: str = "") -> Any:
    """Parsed JSON of `path`; a file that is not UTF-8 JSON is one SlmforgeError naming it (plus
    `hint`, e.g. what to do about it). A missing file raises FileNotFoundError for the caller to word."""
    from slmforge.errors import SlmforgeError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise SlmforgeError(f"{path}: corrupt JSON ({reason}){hint}") from None
