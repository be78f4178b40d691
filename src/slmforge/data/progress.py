"""A one-line progress meter on stderr: documents, tokens, MB of text, MB/s and, when the input
size is known, an ETA. Rewritten in place on a terminal, printed every 30 s into a log file or under
CI (CI=true), silent in quiet mode (SLMFORGE_QUIET=1)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from slmforge.formatting import duration, human, live_terminal, quiet


class Progress:
    """Call `update` as often as convenient; it prints at most every `interval` seconds."""

    def __init__(self, label: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 enabled: bool = True):
        self.label = label
        self.total_bytes = total_bytes
        self.stream = stream or sys.stderr
        self.enabled = enabled and not quiet()
        self.warnings = enabled  # quiet mode still shows warnings
        self.tty = live_terminal(self.stream)
        self.interval = 0.5 if self.tty else 30.0
        self.start = time.monotonic()
        self.last = self.start
        self.session_text_bytes = 0
        self.first_consumed: int | None = None

    def update(self, documents: int, tokens: int, text_bytes: int, consumed: int | None = None,
               new_text_bytes: int = 0, force: bool = False) -> None:
        """Totals so far, the input bytes read so far and the text bytes added since the last call."""
        self.session_text_bytes += new_text_bytes
        if self.first_consumed is None and consumed is not None:
            self.first_consumed = consumed
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (f"{self.label}: {human(documents)} docs, {human(tokens)} tokens, "
                f"{text_bytes / 1e6:,.1f} MB, {self.session_text_bytes / 1e6 / elapsed:.2f} MB/s")
        if self.total_bytes and consumed is not None and self.first_consumed is not None:
            done = consumed - self.first_consumed
            if done > 0:
                left = max(self.total_bytes - consumed, 0) * elapsed / done
                line += f", {100 * consumed / self.total_bytes:.0f}%, ETA {duration(left)}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (a warning, a phase change)."""
        if self.enabled or (self.warnings and message.lstrip().lower().startswith("warning")):
            self.stream.write(("\r\x1b[K" if self.tty else "") + f"{self.label}: {message}\n")
            self.stream.flush()

    def finish(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.label}: {message} in {duration(time.monotonic() - self.start)}\n")
        self.stream.flush()
