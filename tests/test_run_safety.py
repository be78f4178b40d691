"""A run cannot be lost or poisoned: one writer per folder, non-finite steps skipped, SIGUSR1 saves."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import untimed
from slmforge import config
from slmforge.errors import SlmforgeError
from slmforge.objectives.clm import CausalLM
from slmforge.train.config import PretrainConfig
from slmforge.train.lock import RunLock
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=16",
        "optim.lr=3e-3", "schedule.warmup_steps=5", f"train.out_dir={out}", "train.log_every=1",
        "train.eval_every=0", "train.device=cpu", *extra])


def test_a_second_run_on_the_same_folder_refuses_in_one_line(markov_shards, tmp_path):
    _, data = markov_shards
    with RunLock(tmp_path / "run"):  # as if another process were training there
        with pytest.raises(SlmforgeError, match=r"another run is writing to this folder \(pid \d+ on .*started"):
            pretrain(run_config(data, tmp_path / "run", "train.max_steps=2"))
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=2"))  # released: the run goes ahead


def test_a_killed_runs_lock_does_not_block_the_next(tmp_path):
    code = f"from slmforge.train.lock import RunLock; import os; RunLock({str(tmp_path)!r}).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)  # dies holding the lock, never releasing it
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def poison(monkeypatch, steps: set[int]):
    """Make the causal-LM loss NaN on the given (1-based) calls."""
    original = CausalLM.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        value, metrics = original(self, model, batch)
        return (value * float("nan"), metrics) if calls["n"] in steps else (value, metrics)

    monkeypatch.setattr(CausalLM, "loss", loss)


def test_a_non_finite_step_is_skipped_counted_and_logged_as_null(markov_shards, tmp_path, monkeypatch):
    _, data = markov_shards
    poison(monkeypatch, {4})
    run = pretrain(run_config(data, tmp_path / "run", "train.max_steps=8"))
    text = (run / "metrics.jsonl").read_text()
    assert "NaN" not in text  # strict JSON
    records = read_metrics(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == 4 and skipped[0]["loss"] is None
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train" and not r.get("skipped"))
    weights = load_file(run / "checkpoints" / "step-000008" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    state = torch.load(run / "checkpoints" / "step-000008" / "state.pt", weights_only=True)
    assert state["trainer"]["skipped_steps"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_the_run(markov_shards, tmp_path, monkeypatch):
    _, data = markov_shards
    poison(monkeypatch, set(range(5, 100)))
    with pytest.raises(SlmforgeError, match=r"step 7: 3 steps in a row had a non-finite loss"):
        pretrain(run_config(data, tmp_path / "run", "train.max_steps=20", "train.max_bad_steps=3",
                            "train.save_every=2"))
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # the last good checkpoint is intact


def test_the_best_checkpoint_survives_pruning(markov_shards, tmp_path):
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.models import DecoderConfig, build_model

    model = build_model(DecoderConfig.from_name("test-tiny"), seed=0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep_last=1, protect={"step-000002"})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    # The trainer protects the step with the lowest validation loss, and records it.
    _, data = markov_shards
    run = pretrain(run_config(data, tmp_path / "run", "train.max_steps=20", "train.save_every=7",
                              "train.keep_last=1", "train.eval_every=3", "train.eval_batches=2"))
    val = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"]
    best = min(val, key=lambda r: r["loss"])["step"]
    state = torch.load(run / "checkpoints" / "step-000020" / "state.pt", weights_only=True)
    assert state["trainer"]["best_step"] == best
    # Saved when it became the best, although no save step (7, 14) falls on an evaluation (3, 6, ...).
    assert (run / "checkpoints" / f"step-{best:06d}").is_dir() and best % 7 != 0
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == sorted({f"step-{best:06d}", "step-000020"}), kept


def test_sigusr1_saves_and_training_goes_on(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    args = [f"train.data={data}", "model.preset=test-tiny", "train.seq_len=64", "train.batch_size=16",
            "train.max_steps=600", "train.save_every=0", "train.eval_every=0", "train.log_every=20",
            f"train.out_dir={run}", "train.device=cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "slmforge", "pretrain", *args], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGUSR1: saving a checkpoint" in err
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert len(steps) == 2 and steps[-1] == "step-000600"  # one saved on request, then the final one


@pytest.mark.parametrize("damage", ["flip a byte of the weights", "truncate the optimizer state",
                                    "delete the weights"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(markov_shards, tmp_path, damage, capsys):
    _, data = markov_shards
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    # A constant rate after warmup: the damaged run is first trained for 8 steps, and its schedule must
    # not depend on train.max_steps for its resume to retrace the 12-step run.
    common = ("train.max_steps=12", "train.save_every=4", "train.keep_last=0", "train.log_every=2",
              "schedule.decay=constant")
    pretrain(run_config(data, straight, *common))
    pretrain(run_config(data, damaged, *common[:1] + ("train.max_steps=8",) + common[1:]))
    newest = damaged / "checkpoints" / "step-000008"
    if damage.startswith("flip"):
        raw = bytearray((newest / "model.safetensors").read_bytes())
        raw[-5] ^= 0x40  # inside a tensor body: the file still parses, the values are wrong
        (newest / "model.safetensors").write_bytes(bytes(raw))
    elif damage.startswith("truncate"):
        state = newest / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    else:
        (newest / "model.safetensors").unlink()
    capsys.readouterr()
    pretrain(run_config(data, damaged, *common))  # resumes from step 4, says why
    err = capsys.readouterr().err
    assert "step-000008" in err and "trying an older checkpoint" in err and "resumed from" in err
    a = load_file(straight / "checkpoints" / "step-000012" / "model.safetensors")
    b = load_file(damaged / "checkpoints" / "step-000012" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_without_latest_the_run_resumes_from_its_newest_step_folder(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=8", "train.save_every=4"))
    records = len(read_metrics(run / "metrics.jsonl"))
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step-000012.partial").mkdir()  # a crash mid-save leaves this behind
    pretrain(run_config(data, run, "train.max_steps=12", "train.save_every=4"))
    assert len(read_metrics(run / "metrics.jsonl")) > records  # continued, not wiped and restarted
    assert not (run / "checkpoints" / "step-000012.partial").exists()
    state = torch.load(run / "checkpoints" / "step-000012" / "state.pt", weights_only=True)
    assert state["trainer"]["step"] == 12
    checksums = json.loads((run / "checkpoints" / "step-000012" / "checksums.json").read_text())
    assert set(checksums) == {"model.safetensors", "meta.json", "state.pt"}


def test_resume_refuses_exactness_breaking_changes_and_applies_optimizer_ones(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=4", "train.save_every=4"))
    with pytest.raises(SlmforgeError, match=r"resuming with changes .*train.seed 1337 -> 7"):
        pretrain(run_config(data, run, "train.max_steps=8", "train.seed=7"))
    with pytest.raises(SlmforgeError, match=r"train.global_batch 16 -> 32"):
        pretrain(run_config(data, run, "train.max_steps=8", "train.grad_accum=2"))
    # The same data under another spelling of its path is the same data.
    relative = os.path.relpath(data)
    capsys.readouterr()
    pretrain(run_config(relative, run, "train.max_steps=8", "optim.beta2=0.99", "optim.weight_decay=0.05"))
    err = capsys.readouterr().err
    assert "optimizer settings changed since the checkpoint, applied" in err and "0.99" in err
    state = torch.load(run / "checkpoints" / "step-000008" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    pretrain(run_config(data, run, "train.max_steps=10", "train.seed=7", "train.allow_config_changes=true"))
    assert "resuming with changed train.seed 1337 -> 7" in capsys.readouterr().err
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["resumed_from_step"] for h in history] == [0, 4, 8]
    assert history[-1]["config"]["train"]["seed"] == 7


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(markov_shards, tmp_path, monkeypatch):
    import errno

    import slmforge.checkpoint.writing as checkpoint

    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=4", "train.save_every=4"))
    real_save = checkpoint.save_file

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # a partial file exists when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(SlmforgeError, match=r"disk full while writing step-000008 \(needs about .* MiB free\); "
                                            r"the previous checkpoint is intact"):
        pretrain(run_config(data, run, "train.max_steps=8", "train.save_every=4"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000004"]
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    pretrain(run_config(data, run, "train.max_steps=8", "train.save_every=4"))  # space freed: resumes
    assert (run / "checkpoints" / "step-000008").is_dir()


def test_metrics_are_cut_in_place_on_resume_and_a_torn_line_goes(tmp_path):
    from slmforge.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "split": "train", "loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # a crash mid-write
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.truncate_after(2)
    log.write({"step": 3, "split": "train", "loss": 9.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 9.0)]


def test_step_folders_are_ordered_by_number_not_by_name(tmp_path):
    from slmforge.checkpoint.reading import step_folders

    for step in (999_000, 999_500, 1_000_000):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    assert [p.name for p in step_folders(tmp_path)] == ["step-1000000", "step-999500", "step-999000"]


def test_a_real_full_disk_error_from_torch_save_is_one_line(markov_shards, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError, not an OSError."""
    import slmforge.checkpoint.writing as checkpoint

    _, data = markov_shards
    run = tmp_path / "run"

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed, No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(SlmforgeError, match="disk full while writing step-000002"):
        pretrain(run_config(data, run, "train.max_steps=2"))
    assert not list((run / "checkpoints").glob("*.partial"))


def test_allowed_changes_reach_the_data_loader(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=4", "train.save_every=4"))
    capsys.readouterr()
    pretrain(run_config(data, run, "train.max_steps=8", "train.seq_len=32", "train.allow_config_changes=true"))
    err = capsys.readouterr().err
    assert "resuming with changed train.seq_len 64 -> 32" in err and "epoch 0 starts over" in err
    assert (run / "checkpoints" / "step-000008").is_dir()


@pytest.mark.slow
def test_kill_9_at_random_moments_around_checkpoint_writes_never_loses_the_run(markov_shards, tmp_path):
    """A run that saves every step (a 1M-parameter model: writing a checkpoint takes about as long as a
    step, so kills often land inside a write) is killed with SIGKILL at random moments six times, then
    run to the end with the same command: weights and metrics equal a straight run's, bitwise."""
    import random

    _, data = markov_shards
    args = [f"train.data={data}", "model.preset=llama-tiny", "train.seq_len=32", "train.batch_size=8",
            "train.max_steps=40", "train.save_every=1", "train.keep_last=2", "train.log_every=2",
            "train.eval_every=10", "train.eval_batches=2", "optim.lr=1e-3", "schedule.warmup_steps=5"]
    command = [sys.executable, "-m", "slmforge", "--quiet", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command + [f"train.out_dir={tmp_path / 'straight'}"], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    latest = killed / "checkpoints" / "latest"
    rng = random.Random(0)
    during_write = 0
    for _ in range(6):
        before = latest.read_text() if latest.is_file() else ""
        proc = subprocess.Popen(command + [f"train.out_dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while (not latest.is_file() or latest.read_text() == before) and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        during_write += any(killed.glob("checkpoints/*.partial"))
        proc.kill()
        proc.wait()
        if latest.is_file() and latest.read_text().strip() == "step-000040":
            break  # finished before this kill; nothing left to interrupt
    subprocess.run(command + [f"train.out_dir={killed}"], check=True, env=env, capture_output=True)
    print(f"{during_write} of the kills came while a checkpoint was being written")
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000040" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-000040" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert untimed(tmp_path / "straight") == untimed(killed)
