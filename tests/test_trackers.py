"""Trackers get what metrics.jsonl gets: a tiny run logs to wandb (offline), MLflow (file store) and
TensorBoard, and each is read back from its own files with its own reader. A tracker that cannot start
or fails mid-run is reported once and training goes on."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest

from conftest import MarkovSource, write_shards
from slmforge import config
from slmforge.train import metrics as metrics_module
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import MetricsLog, make_trackers, read_metrics
from slmforge.train.pretrain import pretrain

TRACKERS = ("wandb", "mlflow", "tensorboard")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def needs(name: str):
    return pytest.mark.skipif(not installed(name), reason=f"{name} is not installed (pip install 'slmforge[track]')")


def tiny_data(folder: Path) -> Path:
    source = MarkovSource(vocab=16, seed=0)
    return write_shards(folder, {"train": [source.sample(12_000, seed=1)], "val": [source.sample(3_000, seed=2)]},
                        vocab_size=16)


def run_config(data: Path, out: Path, *extra: str) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=4",
        "schedule.warmup_steps=2", f"train.out_dir={out}", "train.log_every=5", "train.eval_every=10",
        "train.eval_batches=2", "train.max_steps=20", *extra])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 20-step run logging to every installed tracker with their defaults (nothing leaves the
    machine), stopped after 10 steps and resumed: the resumed half goes to the same tracker runs."""
    names = [name for name in TRACKERS if installed(name)]
    if not names:
        pytest.skip("none of wandb, mlflow, tensorboard is installed (pip install 'slmforge[track]')")
    tmp = tmp_path_factory.mktemp("tracked")
    run = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        for variable in ("WANDB_MODE", "MLFLOW_TRACKING_URI"):  # the defaults are under test
            mp.delenv(variable, raising=False)
        mp.setenv("WANDB_DIR", str(tmp))  # where wandb would put what it keeps outside the run
        data = tiny_data(tmp / "data")
        for steps in (10, 20):
            pretrain(run_config(data, run, f"tracking.backends={json.dumps(names)}", "tracking.project=trackertest",
                                f"train.max_steps={steps}"))
    return run, read_metrics(run / "metrics.jsonl")


def expected_points(records: list[dict]) -> dict[tuple[int, str], float]:
    """(step, 'split/name') -> value for every number metrics.jsonl holds."""
    points = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                points[(record["step"], f"{record['split']}/{key}")] = float(value)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/bpb"} <= \
        {key for _, key in points}
    return points


# ------------------------------------------------------------------------------------------ wandb


def wandb_log_records(path: Path) -> list[bytes]:
    """The records of a wandb transaction log (run-ID.wandb): a 7-byte file header (":W&B", magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
        elif kind == 0 and length == 0:
            pos += block - pos % block  # zero padding up to the next block
    return records


def wandb_history(run: Path) -> tuple[dict[tuple[int, str], float], dict]:
    from wandb.proto import wandb_internal_pb2

    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1, files  # one wandb run, started twice
    points, run_config_items = {}, {}
    for raw in (raw for f in files for raw in wandb_log_records(f)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step", record.history.step.num)
            points.update({(step, key): value for key, value in items.items() if not key.startswith("_")})
        elif kind in ("run", "config"):  # the config comes with the run record, updates on their own
            update = record.run.config.update if kind == "run" else record.config.update
            run_config_items.update({item.key: json.loads(item.value_json) for item in update})
    return points, run_config_items


@needs("wandb")
def test_wandb_offline_run_files_hold_every_metric(tracked_run):
    run, records = tracked_run
    points, logged_config = wandb_history(run)
    assert points == pytest.approx(expected_points(records), rel=1e-12)
    assert logged_config["train"]["max_steps"] == 20  # the resolved config goes along


# ------------------------------------------------------------------------------------------ mlflow


@needs("mlflow")
def test_mlflow_file_store_holds_every_metric(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, records = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("trackertest")
    [found] = client.search_runs([experiment.experiment_id])  # the resumed half went to the same run
    expected = expected_points(records)
    for key in {key for _, key in expected}:
        history = client.get_metric_history(found.info.run_id, key)
        assert {(m.step, key): m.value for m in history} == \
            pytest.approx({point: v for point, v in expected.items() if point[1] == key}, rel=1e-12), key
    assert found.data.params["train.max_steps"] == "10"  # MLflow parameters cannot change: the first start's
    assert found.info.status == "FINISHED" and found.info.run_name == "run"


# ------------------------------------------------------------------------------------------ tensorboard


@needs("tensorboard")
def test_tensorboard_event_files_hold_every_metric(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tracked_run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert logged == pytest.approx(expected_points(records), rel=1e-6)  # event files hold float32


# ------------------------------------------------------------------------------------------ failures


@needs("mlflow")
def test_a_tracker_that_cannot_start_is_reported_once_and_training_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # MLflow has no store for this
    run = tmp_path / "run"
    pretrain(run_config(tiny_data(tmp_path / "data"), run, "tracking.backends=['mlflow']", "train.max_steps=5"))
    err = capsys.readouterr().err
    assert err.count("tracker 'mlflow' failed to start") == 1, err
    assert (run / "checkpoints" / "latest").is_file()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [5]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert "tracker 'mlflow' failed to start" in events[0]["warning"]


@needs("mlflow")
def test_a_tracker_that_dies_mid_run_is_reported_once_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """The MLflow store disappears after two records (a real failure: its run is gone); the third
    and later records still reach metrics.jsonl and the other trackers."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    trackers = make_trackers(["mlflow", "tensorboard"] if installed("tensorboard") else ["mlflow"],
                             "dying", "run", {"train": {"max_steps": 5}}, run)
    log = MetricsLog(run / "metrics.jsonl", trackers)
    for step in range(1, 6):
        if step == 3:
            shutil.rmtree(run / "mlruns")
        log.write({"step": step, "split": "train", "loss": 1.0 / step})
    log.close()
    err = capsys.readouterr().err
    assert err.count("tracker 'mlflow' failed at step 3") == 1, err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    if installed("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_a_tracker_failing_inside_training_is_dropped_once_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    """Inside the training loop: a tracker whose connection breaks at its second record."""
    calls = []

    class BreaksAtSecondRecord(metrics_module.Tracker):
        name = "tensorboard"

        def __init__(self, *args):
            pass

        def log(self, record):
            calls.append(record["step"])
            if len(calls) == 2:
                raise ConnectionError("connection reset by peer")

    monkeypatch.setitem(metrics_module._TRACKERS, "tensorboard", BreaksAtSecondRecord)
    run = tmp_path / "run"
    pretrain(run_config(tiny_data(tmp_path / "data"), run, "tracking.backends=['tensorboard']"))
    err = capsys.readouterr().err
    assert err.count("tracker 'tensorboard' failed at step 10 (ConnectionError: connection reset by peer)") == 1, err
    assert calls == [5, 10]  # dropped after the failure
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [5, 10, 10, 15, 20, 20]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000020"


def _children_named(word: str) -> list[int]:
    """Processes started by this one whose command line holds `word`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid() \
                    and word in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@needs("wandb")
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds wandb's service process through /proc")
def test_wandb_dying_mid_run_is_reported_once_and_metrics_go_on(tmp_path, monkeypatch, capsys):
    """wandb's service process is killed after two records (as the OOM killer would); its run.log
    raises from then on, and the tracker is dropped with one warning."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    try:
        log = MetricsLog(run / "metrics.jsonl", make_trackers(["wandb"], "dying", "run", {}, run))
        for step in range(1, 6):
            if step == 3:
                services = _children_named("wandb")
                assert services, "wandb's service process was not found"
                for pid in services:
                    os.kill(pid, signal.SIGKILL)
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:  # wandb reaped it first
                        pass
            log.write({"step": step, "split": "train", "loss": 1.0 / step})
        log.close()
    finally:
        try:
            wandb.teardown()  # forget the dead service, so a later wandb.init starts a new one
        except Exception:  # noqa: BLE001 - it is dead; tearing down may say so
            pass
    err = capsys.readouterr().err
    assert err.count("tracker 'wandb' failed at step 3") == 1, err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
