"""train.batch_warmup_steps: micro-batches that grow from a share of batch_size to all of it over the first
steps, with the loader reading only what is trained on, exact resume, and 2 processes still equal to 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_run, crash_at_step, launch
from slmforge import config
from slmforge.data.loader import WindowLoader
from slmforge.data.shards import ShardSet
from slmforge.errors import ConfigError
from slmforge.train.config import PretrainConfig, TrainLoopConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

# batch 8 from a quarter: 2, 4, 6 sequences for 7 steps each, then 8 from step 21
RAMP = ("train.batch_warmup_steps=21", "train.batch_warmup_start=0.25")


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=8",
        "optim.lr=3e-3", "schedule.warmup_steps=4", f"train.out_dir={out}", "train.log_every=1",
        "train.max_steps=30", "train.eval_every=0", "train.device=cpu", *extra])


def train_records(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def test_the_ramp_grows_in_equal_stages_and_is_off_by_default():
    assert TrainLoopConfig().batch_warmup_steps == 0
    assert [TrainLoopConfig().micro_batch_at(s) for s in (0, 5, 10_000)] == [8, 8, 8]
    loop = TrainLoopConfig(batch_size=8, batch_warmup_steps=21, batch_warmup_start=0.25)
    assert [loop.micro_batch_at(s) for s in range(23)] == [2] * 7 + [4] * 7 + [6] * 7 + [8] * 2
    # per process and per share: 2 processes with batch 4 take half of what 1 with batch 8 takes, each step
    half = TrainLoopConfig(batch_size=4, batch_warmup_steps=21, batch_warmup_start=0.25)
    assert all(2 * half.micro_batch_at(s) == loop.micro_batch_at(s) for s in range(40))
    odd = TrainLoopConfig(batch_size=6, batch_warmup_steps=10, batch_warmup_start=0.5)
    assert [odd.micro_batch_at(s) for s in range(11)] == [3] * 10 + [6]


@pytest.mark.parametrize("overrides, message", [
    (("train.batch_warmup_start=1.5",), r"train.batch_warmup_start: must be in \(0, 1\] .*got 1.5"),
    (("train.batch_warmup_start=0.3",), r"train.batch_warmup_start: 0.3 x batch_size 8 = 2.4 sequences; it must "
                                        r"be a whole number that divides batch_size"),
    (("train.batch_warmup_start=0.375",), r"0.375 x batch_size 8 = 3 sequences"),  # 3 does not divide 8
    (("train.batch_warmup_start=0.01",), r"= 0.08 sequences"),
])
def test_a_start_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", "train.batch_size=8",
                                               "train.batch_warmup_steps=10", *overrides])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"train.batch_warmup_steps: must be >= 0, got -1"):
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.batch_warmup_steps=-1"])
    if "1.5" not in overrides[0]:  # whether the start divides the batch matters only while the ramp is on
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", *overrides])


def test_the_loader_hands_out_each_window_once_whatever_the_rows(markov_shards):
    _, data = markov_shards
    shards = ShardSet(data, "train")
    one = WindowLoader(shards, 64, 8, seed=3)
    ranks = [WindowLoader(shards, 64, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen, rows = [], [2, 2, 4, 6, 8, 8]
    for n in rows:
        batch = one.next_batch(n)
        assert batch["tokens"].shape == (n, 65)
        seen.append(batch["sample_ids"])
        # 2 processes taking n / 2 rows each read those windows, rank 0 first
        halves = [loader.next_batch(n // 2)["sample_ids"] for loader in ranks]
        assert torch.equal(torch.cat(halves), batch["sample_ids"])
    order = np.random.default_rng([3, 0]).permutation(one.num_windows)
    assert torch.equal(torch.cat(seen), torch.from_numpy(order[:sum(rows)].astype(np.int64)))  # none skipped
    assert one.state_dict()["consumed"] == sum(rows) == ranks[0].state_dict()["consumed"]
    assert one.next_batch()["tokens"].shape == (8, 65)  # the default is still batch_size


def test_tokens_count_what_was_trained_on_and_the_lr_stays_per_step(markov_shards, tmp_path):
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "full"))
    pretrain(run_config(data, tmp_path / "ramp", *RAMP))
    full, ramp = train_records(tmp_path / "full"), train_records(tmp_path / "ramp")
    rows = [2] * 7 + [4] * 7 + [6] * 7 + [8] * 9
    assert [r["tokens"] for r in ramp] == [64 * sum(rows[:s]) for s in range(1, 31)]
    assert [r["tokens"] for r in full] == [64 * 8 * s for s in range(1, 31)]
    assert [r["lr"] for r in ramp] == [r["lr"] for r in full]
    assert ramp[0]["loss"] != full[0]["loss"]  # the first step already trained on fewer sequences
    meta = (tmp_path / "ramp" / "checkpoints" / "step-000030" / "meta.json").read_text()
    assert f'"tokens_seen": {64 * sum(rows)}' in meta


def test_a_run_resumed_inside_the_ramp_is_bitwise_the_uninterrupted_one(markov_shards, tmp_path, monkeypatch):
    _, data = markov_shards
    common = (*RAMP, "train.save_every=10", "model.dropout=0.1")
    pretrain(run_config(data, tmp_path / "straight", *common))
    with crash_at_step(monkeypatch, 17):  # checkpoint at step 10, in the stage of 4 sequences
        pretrain(run_config(data, tmp_path / "resumed", *common))
    pretrain(run_config(data, tmp_path / "resumed", *common))

    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 30)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_ramp_like_one_with_twice_the_batch(markov_shards, tmp_path):
    _, data = markov_shards
    common = (f"train.data={data}", "model.preset=test-tiny", "train.seq_len=32", "train.max_steps=12",
              "train.log_every=1", "train.eval_every=0", "train.save_every=0", "optim.lr=3e-3",
              "schedule.warmup_steps=3", "train.device=cpu", "train.grad_accum=2",
              "train.batch_warmup_steps=9", "train.batch_warmup_start=0.25")
    launch(1, *common, f"train.out_dir={tmp_path / 'one'}", "train.batch_size=8")
    launch(2, *common, f"train.out_dir={tmp_path / 'two'}", "train.batch_size=4")
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    # global rows per micro-batch: 2, 4, 6 for 3 steps each, then 8; 2 micro-batches of 32 tokens per step
    assert [r["tokens"] for r in one] == [2 * 32 * sum(([2] * 3 + [4] * 3 + [6] * 3 + [8] * 3)[:s])
                                          for s in range(1, 13)]
    for x, y in zip(one, two, strict=True):
        assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)
    a = load_file(tmp_path / "one" / "checkpoints" / "step-000012" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step-000012" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
