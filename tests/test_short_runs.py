"""A short run of a long recipe trains: the command line's max_steps beats the file's epochs, warmup is
capped at a share of the run, the context is checked before training, and sizes meant for a big corpus
warn on a small one."""

from __future__ import annotations

import json

import pytest

from slmforge import config
from slmforge.errors import SlmforgeError
from slmforge.train.config import PretrainConfig
from slmforge.train.pretrain import pretrain
from slmforge.train.run import WARMUP_CAP
from slmforge.train.metrics import read_metrics


def test_max_steps_on_the_command_line_beats_the_files_epochs(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nepochs = 3\n[schedule]\nwarmup_ratio = 0.06\n", encoding="utf-8")
    cfg = config.load(PretrainConfig, recipe, ["train.max_steps=200"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (200, 0)
    assert "train.max_steps on the command line replaces the file's train.epochs = 3" in capsys.readouterr().err
    cfg = config.load(PretrainConfig, recipe, ["schedule.warmup_steps=7"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio, cfg.train.epochs) == (7, None, 3)
    # Both given on the command line: epochs still decides, as documented for the file.
    assert config.load(PretrainConfig, recipe, ["train.max_steps=5", "train.epochs=2"]).train.epochs == 2


def test_a_long_warmup_is_capped_at_a_share_of_a_short_run(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    run = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=8",
        "train.max_steps=20", "schedule.warmup_steps=2000", "optim.lr=1e-2", "train.log_every=1",
        "train.eval_every=0", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}"]))
    cap = int(WARMUP_CAP * 20)
    assert f"schedule.warmup_steps 2000 capped at {cap}" in capsys.readouterr().err
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert lrs[cap - 1] == pytest.approx(1e-2)  # the peak is reached, not 1e-4 of it
    assert config.load(PretrainConfig, run / "config.toml").schedule.warmup_steps == cap  # as recorded


def test_an_encoder_decoder_longer_than_its_context_is_refused_before_training(tmp_path):
    from test_translation import translate_config

    from slmforge.finetune.run import finetune

    with pytest.raises(SlmforgeError, match="train.seq_len: 100 exceeds the model's context"):
        finetune(translate_config(tmp_path, "train.seq_len=100", "model.max_seq_len=64"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_held_out_sizes_that_leave_train_the_smallest_split_warn(tmp_path, capsys):
    from test_translation import pairs_config

    from slmforge.data.pairs import make_pairs

    rows = [{"de": f"satz nummer {i}", "en": f"sentence number {i}"} for i in range(120)]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    make_pairs(pairs_config(tmp_path, {"path": str(source), "src_field": "de", "tgt_field": "en"},
                            test_size=60, val_size=30))
    err = capsys.readouterr().err
    assert "warning: only 30 training pairs, fewer than test (test 60)" in err
    make_pairs(pairs_config(tmp_path, {"path": str(source), "src_field": "de", "tgt_field": "en"}))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("busy, processes, expected", [(0.0, 1, 4), (1.2, 1, 3), (3.9, 1, 1), (0.0, 2, 2),
                                                       (None, 1, 4)])
def test_cpu_training_takes_the_cores_other_processes_leave(monkeypatch, capsys, busy, processes, expected):
    import os

    import torch

    from slmforge import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runtime, "others_busy_cores", lambda: busy)
    previous = torch.get_num_threads()
    try:
        assert runtime.cpu_threads_for_training(processes) == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    assert f"CPU: {expected} thread" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads_for_training(processes) == torch.get_num_threads()  # the user's choice stands


def test_the_load_of_another_process_is_measured():
    import subprocess
    import sys

    from slmforge.runtime import others_busy_cores

    idle_or_not = others_busy_cores(0.2)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        with_spinner = others_busy_cores(0.5)
    finally:
        spinner.kill()
    assert idle_or_not is not None and with_spinner is not None
    assert with_spinner >= 0.7  # one core kept busy (shared machines add more, never less)
