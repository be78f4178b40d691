"""What a training run does when the outside world asks it to stop or to save.

    SIGINT (Ctrl-C)   finish the step, save, flush, exit 130; a second one aborts at once
    SIGTERM           the same, exit 143 (schedulers and `kill` send it before killing)
    SIGUSR1           save a checkpoint at the next step boundary and keep training
                      (SLURM: `#SBATCH --signal=USR1@120` asks two minutes before the time limit)

The training verbs (pretrain, finetune, distill) have the handlers from the start of the process
(`verb_signals`, installed by the CLI before it imports the verbs' modules), so the whole run keeps
that promise:

    set-up            (imports, process group, run folder, model, data, resume) no step is trained yet:
                      a stop signal stops at once with one line, "stopped by SIGTERM during set-up;
                      nothing to save", and the same exit status
    training          handlers only set flags; the loop acts on them at a step boundary, where weights,
                      optimizer, loader and RNG agree, so the checkpoint resumes exactly. The final
                      evaluation and save run to the end, then the run stops with one line
    a second signal   while a checkpoint is being written: that write is finished first (said at
                      once), then the run stops; a third aborts it. Otherwise it aborts at once, in one
                      line ("SIGTERM again: stopped at once without saving; ...")

Under torchrun, a worker whose launcher is gone (the agent killed) says so and stops as on SIGTERM
(`watch_launcher`) instead of waiting for collectives that nobody will complete.

Only the main thread can own signal handlers; elsewhere (a notebook's worker thread) this does nothing.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

LAUNCHER_GONE_GRACE_S = 120.0
"""After the launcher is gone: how long a worker that was asked to stop may take before it ends
regardless (one blocked inside torch, in a collective or a teardown, cannot act on the request)."""

_active: "RunSignals | None" = None  # the handlers installed in this process now (main thread only)
_waiting_in_torch = 0  # > 0 while the main thread waits inside torch, where no Python handler can run
_watcher: threading.Thread | None = None
_launcher: int | None = None  # the watched launcher's pid


class StopRequested(KeyboardInterrupt):
    """Raised when a signal stopped the run; the CLI exits with `exit_code`, printing the message
    unless `said` (the trainer printed it already, or this is not rank 0)."""

    said = True

    def __init__(self, message: str, exit_code: int, said: bool | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        if said is not None:
            self.said = said


def _is_main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _spoken(name: str) -> str:
    return "Ctrl-C" if name == "SIGINT" else name


class RunSignals:
    """The run's signal handlers and what they were asked. `phase` is "set-up" (nothing trained yet:
    a stop signal raises StopRequested at once), "training" (flags only, acted on at step boundaries)
    or "finished" (everything saved; a stop signal is reported when the verb returns)."""

    def __init__(self, log, phase: str = "training"):
        self.log = log
        self.phase = phase
        self.stop_signal: str | None = None  # "SIGINT" / "SIGTERM" once asked to stop
        self.late_signal: str | None = None  # the first one came after the run had finished and saved
        self.save_requested = False
        self.writing = 0  # checkpoint writes in progress (see `saving`)
        self._spared = False  # a repeated signal already let a write in progress finish
        self._announced: set[str] = set()
        self._previous: dict[int, object] = {}
        self._outer: RunSignals | None = None

    def _stop(self, signum, frame) -> None:
        # Only flags, or an exception, here: printing inside a handler can interrupt a print in progress.
        name = signal.Signals(signum).name
        code = SIGNAL_EXIT_CODES.get(name, 130)
        first = self.stop_signal is None
        if first:
            self.stop_signal = name
        if self.phase == "set-up":
            self.phase = "stopping"  # unwinding: a further signal aborts the clean-up, saying so
            raise StopRequested(f"stopped by {_spoken(name)} during set-up; nothing to save", code,
                                said=not _is_main_rank())
        if self.phase == "stopping" or (self.phase == "finished" and not first):
            raise StopRequested(f"{_spoken(name)} again: stopping at once", code, said=not _is_main_rank())
        if first:
            if self.phase == "finished":
                self.late_signal = name  # said when the verb returns
            return  # acted on at the next step boundary, or after the final save
        if self.writing and not self._spared:
            self._spared = True
            _say_now(f"{_spoken(name)} again: finishing the checkpoint being written, then stopping "
                     f"({_spoken(name)} once more to abort it)")
            return
        lost = "; the checkpoint being written is discarded" if self.writing else ""
        raise StopRequested(f"{_spoken(name)} again: stopped at once without saving{lost}; the same command "
                            f"resumes from the newest checkpoint", code, said=not _is_main_rank())

    def _save(self, signum, frame) -> None:
        self.save_requested = True

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Mark a checkpoint write in progress: a second stop signal lets it finish."""
        self.writing += 1
        try:
            yield
        finally:
            self.writing -= 1

    def announce(self) -> None:
        """Say what was asked, once, from the loop (never from inside a handler)."""
        if self.stop_signal and self.stop_signal not in self._announced:
            what = _spoken(self.stop_signal)
            self.log(f"{what}: stopping after this step and saving a checkpoint ({what} again to abort)")
            self._announced.add(self.stop_signal)
        if self.save_requested:
            self.log("SIGUSR1: saving a checkpoint after this step, then training on")

    def __enter__(self) -> "RunSignals":
        global _active
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGINT, self._stop), (signal.SIGTERM, self._stop)):
                self._previous[sig] = signal.signal(sig, handler)
            if hasattr(signal, "SIGUSR1"):
                self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._save)
            self._outer, _active = _active, self
        return self

    def __exit__(self, *_) -> None:
        global _active
        if self._previous:
            _active = self._outer
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


@contextmanager
def training_signals(log) -> Iterator[RunSignals]:
    """The handlers for a training loop: those the verb installed at its start (now in the training
    phase, speaking through `log`), or, when the Trainer runs on its own (a library call), its own
    for the length of the loop."""
    outer = _active if threading.current_thread() is threading.main_thread() else None
    if outer is None:
        with RunSignals(log) as own:
            yield own
        return
    previous_log, outer.log, outer.phase = outer.log, log, "training"
    try:
        yield outer
    finally:
        outer.log, outer.phase = previous_log, "finished"


@contextmanager
def verb_signals() -> Iterator[RunSignals]:
    """A training verb's handlers, from before its set-up to its end (the CLI enters this before it
    imports the verbs' modules), and the launcher watch under torchrun: a signal during set-up,
    training or the final save is answered in one line with the signal's exit status (see above)."""
    from slmforge.formatting import say

    with RunSignals(say, phase="set-up") as signals:
        watch_launcher()
        yield signals
        if signals.late_signal is not None:
            name = signals.late_signal
            raise StopRequested(f"{_spoken(name)} after the run had finished; everything is saved",
                                SIGNAL_EXIT_CODES.get(name, 130), said=not _is_main_rank())


@contextmanager
def released() -> Iterator[None]:
    """The handlers the process had before the training verb's, for a part of it that trains nothing
    (distill --build-cache): a signal acts there as it does in any other verb."""
    active = _active if threading.current_thread() is threading.main_thread() else None
    if active is None:
        yield
        return
    ours = {sig: signal.signal(sig, previous) for sig, previous in active._previous.items()}
    try:
        yield
    finally:
        for sig, handler in ours.items():
            signal.signal(sig, handler)


@contextmanager
def waiting_in_torch() -> Iterator[None]:
    """Mark a wait inside torch (the rendezvous) where no Python signal handler can run: a worker
    whose launcher is gone then ends at once instead of waiting for its timeout."""
    global _waiting_in_torch
    _waiting_in_torch += 1
    try:
        yield
    finally:
        _waiting_in_torch -= 1


def _say_now(message: str) -> None:
    """A status line from inside a signal handler (rank 0, not in quiet mode): written to the file
    descriptor directly, since the handler may have interrupted a print to sys.stderr."""
    from slmforge.formatting import quiet

    if _is_main_rank() and not quiet():
        try:
            os.write(2, f"{message}\n".encode())
        except OSError:
            pass


def end_if_orphaned(exit_code: int) -> None:
    """Once a run has stopped because its launcher is gone: end the process now, skipping the teardown
    of torch's objects. A gloo process group's destructor can deadlock (holding the GIL) once its peers
    have exited, and no launcher is left to kill the process. (This rank may have stopped because
    another rank's watch saw it first: the parent is asked again here.)"""
    if _launcher is not None and os.getppid() != _launcher:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(exit_code)


def watch_launcher(grace_s: float = LAUNCHER_GONE_GRACE_S, interval_s: float = 0.5) -> threading.Thread | None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), a daemon thread that notices when this worker's parent,
    the launcher, is gone (killed: it can no longer stop or restart its workers), says so in one line
    and stops the run as SIGTERM does: at once during set-up, with a checkpoint during training. A
    worker waiting inside torch (the rendezvous) ends at once; any worker still alive `grace_s` later
    ends then, without saving. Elsewhere (one process, srun, a plain shell that may exit under nohup)
    nothing is watched."""
    global _watcher, _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.name != "posix" or _watcher is not None:
        return _watcher
    parent = _launcher = os.getppid()
    err = os.dup(2)  # the real stderr, also while fd 2 is held (see parallel.held_stderr)

    def say(message: str) -> None:
        try:
            os.write(err, f"slmforge: {message}\n".encode())
        except OSError:
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        rank = os.environ.get("RANK", "?")
        say(f"error: rank {rank}: the launcher (pid {parent}) is gone; stopping")
        if _waiting_in_torch:
            os._exit(1)
        # The deadline is kept by faulthandler's watchdog, a C thread: it ends the process also where
        # that hangs holding the GIL, as a gloo process group's teardown can once its peers have exited
        # (no Python thread could run then). Its traceback dump goes nowhere: the line above says why.
        faulthandler.dump_traceback_later(grace_s, exit=True, file=open(os.devnull, "w"))
        os.kill(os.getpid(), signal.SIGTERM)

    _watcher = threading.Thread(target=watch, name="slmforge-launcher-watch", daemon=True)
    _watcher.start()
    return _watcher
