"""The quickstart runs end to end on the built-in corpus (shortened) and leaves a readable run folder."""

from __future__ import annotations

import json

import pytest

from slmforge.quickstart.pipeline import quickstart
from slmforge.train.metrics import read_metrics

pytest.importorskip("plone.app.locales", reason="the demo corpus needs slmforge[demo]")


def test_quickstart_end_to_end(tmp_path, capsys):
    run = quickstart(tmp_path / "qs", max_steps=30, seq_len=64, batch_size=8, vocab_size=1024)
    for name in ("corpus/hi.txt", "corpus/as.txt", "tokenizer/tokenizer.json", "data/manifest.json",
                 "config.toml", "metrics.jsonl", "plots/loss.png", "checkpoints/step-000030/eval.json",
                 "samples.txt", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert not (run / "eval.json").exists()  # one place for eval results: the checkpoint folder
    report = json.loads((run / "checkpoints" / "step-000030" / "eval.json").read_text(encoding="utf-8"))
    # every language extracted is evaluated and sampled, Assamese (only a few lines) included
    assert {f"held-out {lang}" for lang in ("hi", "en", "de", "bn", "as")} == set(report)
    assert {line.split("]")[0] + "]" for line in (run / "samples.txt").read_text(encoding="utf-8").splitlines()
            if line.startswith("[")} >= {"[hi]", "[en]", "[de]", "[bn]", "[as]"}
    for row in report.values():
        assert 0 < row["bpb"] < 8 and row["tokens"] > 0
    manifest = json.loads((run / "data" / "manifest.json").read_text(encoding="utf-8"))
    assert {s["lang"] for s in manifest["sources"]} >= {"hi", "en", "de", "bn", "as"}
    train = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1] < train[0] - 1.0  # 30 steps move a fresh model well below its starting loss
    out = capsys.readouterr().out
    assert "[hi] यह खाता" in out and f"run folder: {run}" in out


def test_missing_demo_packages_are_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.errors import SlmforgeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("plone") else real(name, *a))
    with pytest.raises(SlmforgeError, match=r"needs the package 'plone.app.locales': pip install"):
        build_demo_corpus(tmp_path)


def test_training_is_muon_with_wsd_and_a_batch_warmup_where_torch_has_muon(monkeypatch, capsys):
    import torch

    from slmforge.quickstart.pipeline import ADAMW_MAX_STEPS, MAX_STEPS, training_tables

    if hasattr(torch.optim, "Muon"):
        steps, optim, schedule, ramp = training_tables(None, 16)
        assert (steps, optim["kind"], schedule["decay"]) == (MAX_STEPS, "muon", "wsd")
        assert ramp == {"batch_warmup_steps": round(0.3 * MAX_STEPS), "batch_warmup_start": 0.25}
        assert training_tables(40, 16)[0] == 40 and training_tables(40, 16)[3]["batch_warmup_steps"] == 12
        assert training_tables(None, 10)[3] == {}  # 10 / 4 sequences is no whole stage: no warmup
        monkeypatch.delattr(torch.optim, "Muon")
    steps, optim, schedule, ramp = training_tables(None, 16)  # an older torch: AdamW + cosine, said in one line
    assert (steps, optim["kind"], schedule["decay"], ramp) == (ADAMW_MAX_STEPS, "adamw", "cosine", {})
    assert "has no torch.optim.Muon" in capsys.readouterr().err
