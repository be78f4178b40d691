"""metrics.jsonl (one JSON object per record, flushed and fsynced as written), loss plots, trackers.

Seed 003 lost every log after step 71k when a crash hit at 110k because its logs sat in a buffer;
here each record reaches the disk before training continues.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any



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
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()


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


class Tracker:
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _WandbTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path):
        import wandb

        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), resume="allow")

    def log(self, record):
        prefix = record.get("split", "train")
        self.run.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                     step=record.get("step"))

    def close(self):
        self.run.finish()


class _MlflowTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=name)
        mlflow.log_params(_flatten(config))

    def log(self, record):
        prefix = record.get("split", "train")
        values = {f"{prefix}_{k}": float(v) for k, v in record.items()
                  if isinstance(v, (int, float)) and k != "step"}
        self.mlflow.log_metrics(values, step=int(record.get("step", 0)))

    def close(self):
        self.mlflow.end_run()


class _TensorboardTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any], run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record):
        prefix = record.get("split", "train")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{prefix}/{k}", v, int(record.get("step", 0)))
        self.writer.flush()

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
    """Start the requested trackers; a missing package is reported once and skipped (metrics.jsonl stays)."""
    trackers = []
    for name in names:
        try:
            trackers.append(_TRACKERS[name](project, run_name, config, run_dir))
        except ImportError as e:
            print(f"slmforge: tracker {name!r} unavailable ({e}); install slmforge[track]. "
                  f"Continuing with metrics.jsonl only.", file=sys.stderr)
    return trackers
