"""metrics.jsonl (one JSON object per record, flushed and fsynced as written), loss plots, trackers.

Seed 003 lost every log after step 71k when a crash hit at 110k because its logs sat in a buffer;
here each record reaches the disk before training continues.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any


# Fields of a train record that measure the machine rather than the training: they differ between
# two runs of the same training (compare runs without them).
TIMING_FIELDS = ("tokens_per_s", "tflops", "mfu", "elapsed_s")


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: str | Path, trackers: list["Tracker"] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = trackers or []
        self._file = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step` (used when resuming from that step).

        Records are appended in step order, so this cuts the file in place at the first later record
        (or a torn last line): no second copy of a long metrics.jsonl needs room on a full disk."""
        self._file.close()
        with open(self.path, "r+b") as f:
            keep = 0
            for line in iter(f.readline, b""):
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a line torn by a crash mid-write, and anything after it
                if not line.endswith(b"\n") or (isinstance(record, dict) and record.get("step", 0) > step):
                    break
                keep += len(line)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # Strict JSON: a NaN or infinite number is written as null (bare NaN is not JSON).
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        for tracker in list(self.trackers):
            self._guarded(tracker, lambda: tracker.log(record), record.get("step"))

    def close(self) -> None:
        self._file.close()
        for tracker in list(self.trackers):
            self._guarded(tracker, tracker.close, None)
        self.trackers = []

    def _guarded(self, tracker: "Tracker", call, step: int | None) -> None:
        """Run a tracker call; a tracker that fails is reported once and dropped, training goes on."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a dead tracker (full disk, lost server) must not stop training
            self.trackers.remove(tracker)
            where = f" at step {step}" if step is not None else " while closing"
            record_event(self.path.parent, f"tracker {tracker.name!r} failed{where} ({type(e).__name__}: {e}); "
                                           f"it is stopped, metrics.jsonl keeps every record", step)
            if step is not None:  # let it release what it holds (threads, files); it may fail again
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001
                    pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Train and validation loss against step as a PNG; returns None when there is nothing to plot."""
    # A Figure with its own Agg canvas: no pyplot state, so a notebook's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    return out_png


# ---------------------------------------------------------------- optional experiment trackers
#
# Each tracker gets what metrics.jsonl gets, as numbers named `split/name` (`train/loss`, `val/bpb`)
# against the optimizer step. Everything is local unless the user asks otherwise: wandb runs offline
# (WANDB_MODE=online to upload as it trains), MLflow writes a file store under the run folder
# (MLFLOW_TRACKING_URI for a server), TensorBoard writes event files under the run folder. A tracker
# is an extra: one that cannot start, or fails later, is reported once and dropped, and training
# goes on with metrics.jsonl, which always has every record.

EVENTS = "events.jsonl"  # warnings worth keeping with the run (a tracker that stopped, ...)
TRACKER_IDS = "trackers.json"  # run ids per tracker, so a resumed run continues the same tracker run


def record_event(run_dir: str | Path, message: str, step: int | None = None) -> None:
    """Say a warning and keep it in run/events.jsonl, where `slmforge report` finds it."""
    from slmforge.formatting import say

    say(f"warning: {message}")
    try:
        with open(Path(run_dir) / EVENTS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step, "warning": message},
                               ensure_ascii=False) + "\n")
    except OSError:
        pass  # a warning that cannot be kept must not stop training; it was said above


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record as tracker metrics: `split/name` -> value (no step, no
    text, no nulls: a skipped step's null loss is not a point on a curve)."""
    split = record.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    name = "tracker"
    where: str | Path = ""  # where its records go, said once at the start

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path, ids: dict[str, Any]):
        import wandb

        # An id of our own, kept in the run folder: a resumed run appends to the same wandb run.
        ids.setdefault("wandb", {"id": secrets.token_hex(4)})
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), id=ids["wandb"]["id"],
                              resume="allow", mode=mode, reinit="create_new",
                              # wandb must not capture the terminal: the progress line and test output stay ours
                              settings={"console": "off", "silent": True})
        self.where = f"{run_dir / 'wandb'} ({mode}" + ("; upload with `wandb sync`)" if mode == "offline" else ")")

    def log(self, record):
        self.run.log(tracker_values(record), step=record.get("step"))

    def close(self):
        self.run.finish()


class _MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path, ids: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in to use it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # The client API, not mlflow's global "active run": two runs in one process stay apart.
        self.client = MlflowClient(tracking_uri=uri)
        saved = ids.get("mlflow") or {}
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - the run was deleted from the store: start a new one
                self.run_id = None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            # Parameters cannot change once logged, so a resumed run keeps those of its first start.
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            ids["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}
        self.where = uri

    def log(self, record):
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in tracker_values(record).items()])

    def close(self):
        self.client.set_terminated(self.run_id)


class _TensorboardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path, ids: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.where = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.where))

    def log(self, record):
        step = int(record.get("step", 0))
        for k, v in tracker_values(record).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # on disk at each record, like metrics.jsonl

    def close(self):
        self.writer.close()


_TRACKERS = {"wandb": _WandbTracker, "mlflow": _MlflowTracker, "tensorboard": _TensorboardTracker}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def make_trackers(names: list[str], project: str, run_name: str, config: dict[str, Any],
                  run_dir: Path) -> list[Tracker]:
    """Start the requested trackers. One that cannot start (package missing, a bad setting, a server
    that does not answer) is reported once and skipped: metrics.jsonl has every record anyway."""
    from slmforge.fileio import write_json_atomic
    from slmforge.formatting import say

    run_dir = Path(run_dir)
    ids_path = run_dir / TRACKER_IDS
    try:
        ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else {}
    except ValueError:
        ids = {}
    trackers = []
    for name in names:
        try:
            tracker = _TRACKERS[name](project, run_name, config, run_dir, ids)
        except ImportError as e:
            record_event(run_dir, f"tracker {name!r} unavailable ({e}); install slmforge[track]. "
                                  f"Continuing with metrics.jsonl only.")
        except Exception as e:  # noqa: BLE001 - any failure of an optional extra must not stop training
            record_event(run_dir, f"tracker {name!r} failed to start ({type(e).__name__}: {e}); "
                                  f"continuing with metrics.jsonl only")
        else:
            trackers.append(tracker)
            say(f"tracking with {name}" + (f": {tracker.where}" if tracker.where else ""))
    if ids:
        write_json_atomic(ids_path, ids)
    return trackers
