"""benchmarks/time_to_quality.py (issue 25) in its smallest form, so that it cannot rot: both sides (the
transformers Trainer baseline and slmforge's pretrain) train from the same exported weights, are evaluated
by the same code, and the table, curves and JSON are written. No timing or quality is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the baseline side is transformers' Trainer")
pytest.importorskip("matplotlib", reason="the curves are drawn with matplotlib")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["decoder", "encoder"])
def test_smallest_run_writes_table_curves_and_results(model, mlm_markov_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import time_to_quality

    _, data = mlm_markov_shards
    out = tmp_path / "out"
    assert time_to_quality.main(["--model", model, "--steps", "4", "--evals", "2", "--eval-batches", "1",
                                 "--batch-size", "2", "--seq-len", "32", "--seeds", "1", "--recipes", "adamw",
                                 "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    runs = report["results"]
    assert set(runs) == {"baseline", "adamw"}
    base, ours = runs["baseline"]["0"], runs["adamw"]["0"]
    assert base[0] == ours[0]  # the shared starting point: identical weights, one evaluation
    assert [p["step"] for p in base] == [p["step"] for p in ours] == [0, 2, 4]
    assert [p["tokens"] for p in base] == [p["tokens"] for p in ours] == [0, 2 * 2 * 32, 4 * 2 * 32]
    for p in base + ours:
        assert math.isfinite(p["loss"]) and p["cpu_s"] >= 0
    assert ("bpb" in base[-1]) == (model == "decoder")
    assert (out / "curves.png").stat().st_size > 0
    assert "| slmforge adamw |" in (out / "table.md").read_text()
    assert "tokens to baseline's final" in capsys.readouterr().out


def test_recipe_overrides_and_baseline_reuse(mlm_markov_shards, tmp_path, monkeypatch):
    """A recipe spec `name+section.field=value` changes only what it names; --reuse-baseline reads the
    saved baseline curve for the same settings (and only for them)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import time_to_quality

    tables = time_to_quality.recipe_tables('muon-wsd+optim.muon_lr=0.01+objective.kind="mlm"+schedule.cooldown_ratio=0.3')
    assert tables == {"optim": {"kind": "muon", "muon_lr": 0.01}, "schedule": {"decay": "wsd", "cooldown_ratio": 0.3},
                      "objective": {"kind": "mlm"}}
    assert time_to_quality.RECIPES["muon-wsd"]["optim"] == {"kind": "muon"}  # the named recipe is untouched
    for bad in ("nope", "adamw+optim", "adamw+lr=1"):
        with pytest.raises(SystemExit):
            time_to_quality.recipe_tables(bad)

    _, data = mlm_markov_shards
    out = tmp_path / "out"
    argv = ["--model", "encoder", "--steps", "2", "--evals", "1", "--eval-batches", "1", "--batch-size", "2",
            "--seq-len", "32", "--seeds", "1", "--data", str(data), "--out", str(out)]
    assert time_to_quality.main([*argv, "--recipes", "adamw+optim.lr=1e-3"]) == 0
    first = json.loads((out / "results.json").read_text())["results"]
    saved = json.loads((out / "baseline-0.json").read_text())
    saved["points"][-1]["loss"] = 123.0  # a marker: reused means read from this file, not retrained
    (out / "baseline-0.json").write_text(json.dumps(saved))
    assert time_to_quality.main([*argv, "--recipes", "adamw", "--reuse-baseline"]) == 0
    assert json.loads((out / "results.json").read_text())["results"]["baseline"]["0"][-1]["loss"] == 123.0
    assert time_to_quality.main([*argv, "--recipes", "adamw", "--reuse-baseline", "--eval-batches", "2"]) == 0
    rerun = json.loads((out / "results.json").read_text())["results"]["baseline"]["0"]
    assert rerun[-1]["loss"] != 123.0  # other settings: the baseline ran again
    assert first["adamw+optim.lr=1e-3"]["0"][-1]["loss"] != first["baseline"]["0"][-1]["loss"]
