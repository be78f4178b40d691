"""What a training run does when the outside world asks it to stop or to save.

    SIGINT (Ctrl-C)   finish the step, save, flush, exit 130; a second one aborts at once
    SIGTERM           the same, exit 143 (schedulers and `kill` send it before killing)
    SIGUSR1           save a checkpoint at the next step boundary and keep training
                      (SLURM: `#SBATCH --signal=USR1@120` asks two minutes before the time limit)

Handlers only set flags; the loop acts on them at a step boundary, where weights, optimizer, loader
and RNG agree, so the checkpoint resumes exactly. Only the main thread can own signal handlers;
elsewhere (a notebook's worker thread) this does nothing.
"""

from __future__ import annotations

import signal
import threading

SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopRequested(KeyboardInterrupt):
    """Raised after the run saved because a signal asked it to stop; the CLI exits with `exit_code`."""

    said = True  # the trainer printed the message (rank 0 only): the CLI does not repeat it

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunSignals:
    def __init__(self, log):
        self.log = log
        self.stop_signal: str | None = None  # "SIGINT" / "SIGTERM" once asked to stop
        self.save_requested = False
        self._announced: set[str] = set()
        self._previous: dict[int, object] = {}

    def _stop(self, signum, frame) -> None:
        # Only flags here: printing inside a handler can interrupt a print in progress.
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            raise StopRequested(f"{name} again: stopped without saving", SIGNAL_EXIT_CODES.get(name, 130))
        self.stop_signal = name

    def _save(self, signum, frame) -> None:
        self.save_requested = True

    def announce(self) -> None:
        """Say what was asked, once, from the loop (never from inside a handler)."""
        if self.stop_signal and self.stop_signal not in self._announced:
            what = "Ctrl-C" if self.stop_signal == "SIGINT" else self.stop_signal
            self.log(f"{what}: stopping after this step and saving a checkpoint ({what} again to abort)")
            self._announced.add(self.stop_signal)
        if self.save_requested:
            self.log("SIGUSR1: saving a checkpoint after this step, then training on")

    def __enter__(self) -> "RunSignals":
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGINT, self._stop), (signal.SIGTERM, self._stop)):
                self._previous[sig] = signal.signal(sig, handler)
            if hasattr(signal, "SIGUSR1"):
                self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._save)
        return self

    def __exit__(self, *_) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
