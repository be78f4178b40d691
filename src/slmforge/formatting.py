"""Progress messages, numbers and durations, shared by every long-running verb."""

from __future__ import annotations

import os
import sys


def human(n: float) -> str:
    """1234567 -> '1.2M'; small numbers stay whole."""
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 75 -> '1m15s'."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def say(message: str) -> None:
    """A progress or status line on stderr (stdout stays for results: tables, paths, generated text).

    In a job of several processes (torchrun, srun) only rank 0 speaks, or every line would come N times.
    In quiet mode only warnings and errors are said."""
    if quiet() and not message.lstrip().lower().startswith(("warning", "error")):
        return
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(message, file=sys.stderr, flush=True)


def quiet() -> bool:
    """Quiet mode (SLMFORGE_QUIET=1, what a `--quiet` flag sets): no progress or status lines."""
    return os.environ.get("SLMFORGE_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def live_terminal(stream) -> bool:
    """Whether progress may be redrawn in place on `stream`: a terminal, and not a CI job (CI=true),
    whose log would keep every redrawn frame; elsewhere progress is one line per interval."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        tty = False
    return tty and os.environ.get("CI", "").strip().lower() in ("", "0", "false", "no")
