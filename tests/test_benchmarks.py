"""The benchmark suite in its smallest form, so that it cannot rot: `python -m benchmarks --shapes smoke`
runs every measurement (training, decoding, loss, data) on both sides and writes its report. No timing
is asserted: numbers from a test machine mean nothing; the structure and the checks inside do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmarks compare against transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.__main__ as suite

    return suite


def test_smoke_run_measures_everything_and_writes_the_report(suite, tmp_path):
    lines = []
    rows = suite.main(["--shapes", "smoke", "--device", "cpu", "--out", str(tmp_path)], log=lines.append)
    assert {row.measurement for row in rows} == {"training", "decoding", "loss", "data"}
    (json_path,) = tmp_path.glob("bench-cpu-smoke-float32-*threads.json")
    report = json.loads(json_path.read_text())
    env = report["environment"]
    for key in ("date", "device", "torch", "transformers", "threads", "shapes", "dtype"):
        assert env[key] not in (None, "")
    for row in report["rows"]:
        assert row["slmforge"] is not None and row["baseline"] is not None, row
        if row["metric"] in ("tokens/s", "new tokens/s", "MB/s", "seconds", "MFU %"):
            assert row["slmforge"] > 0 and row["baseline"] > 0, row
            assert math.isclose(row["ratio"], row["slmforge"] / row["baseline"])
    metrics = {(row["measurement"], row["metric"]) for row in report["rows"]}
    assert {("training", "tokens/s"), ("training", "MFU %"), ("training", "peak MiB added by a step"),
            ("decoding", "new tokens/s"), ("loss", "seconds"), ("loss", "peak MiB"), ("data", "MB/s")} <= metrics
    decoding = [row for row in report["rows"] if row["measurement"] == "decoding"]
    assert all(row["extra"]["identical_prefix"] == row["extra"]["new_tokens"] for row in decoding)
    markdown = json_path.with_suffix(".md").read_text()
    assert "| measurement | case | metric | slmforge | baseline | ratio |" in markdown
    assert any("ratio" in line for line in lines)


@pytest.mark.slow
def test_compiled_decoding_is_a_third_side_with_the_same_tokens(suite, tmp_path):
    """`--compile` (always on with --device cuda) adds slmforge's compiled static decode to decoding."""
    rows = suite.main(["--shapes", "smoke", "--device", "cpu", "--only", "decoding", "--compile", "--out",
                       str(tmp_path)], log=lambda line: None)
    compiled = [row for row in rows if row.metric == "new tokens/s, compiled static decode"]
    assert len(compiled) == 2 and all(row.slmforge > 0 and row.baseline > 0 for row in compiled)
    assert all(row.extra["same_as_cached"] and row.extra["identical_prefix"] == row.extra["new_tokens"]
               and row.extra["compile_s"] > 0 for row in compiled)


def test_gpu_shapes_are_the_ones_the_issue_names(suite):
    from benchmarks.models import model_config
    from benchmarks.shapes import SHAPES

    gpu = SHAPES["gpu"]
    shapes = {(model_config(case.model).vocab_size, case.batch, case.seq_len, case.objective) for case in gpu.training}
    assert {(50_000, 16, 1024, "clm"), (262_144, 16, 1024, "clm"), (50_304, 16, 1024, "clm")} <= shapes
    assert any(case.objective == "mlm" for case in gpu.training)
    assert model_config(gpu.training[1].model).num_parameters() > 260e6  # Gemma 3 270M itself
    short = [case for case in gpu.decoding if case.prompt == 128]
    assert {model_config(case.model).family for case in short} == {"gemma3", "llama"}
    assert all(case.batches == (1, 32) and case.new == 256 for case in short)
    assert gpu.loss[0].vocab == 262_144 and gpu.dtype == "bfloat16" and gpu.rounds >= 3
    for shapes in SHAPES.values():
        for case in shapes.training + shapes.decoding:
            model_config(case.model)  # every table is a valid config


def test_unknown_measurement_is_refused(suite):
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "training,nonsense"])
