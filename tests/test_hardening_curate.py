"""`slmforge data curate` on a raw dump with unreadable files: they are named on the console, a dump of
nothing but unreadable files is an error (exit 2), and datatrove's tqdm bars stay off the terminal."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from slmforge import config  # noqa: E402
from slmforge.cli import main  # noqa: E402
from slmforge.curate.config import CurateConfig  # noqa: E402
from slmforge.curate.pipeline import curate  # noqa: E402
from slmforge.errors import SlmforgeError  # noqa: E402

TEXTS = ["The capital of India is New Delhi and it is a large city in the north of the country.",
         "Die Hauptstadt von Deutschland ist Berlin und sie ist die größte Stadt des Landes."]


def unreadable(folder: Path) -> list[Path]:
    """A binary (non-UTF-8) file and a truncated .gz."""
    binary = folder / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x89PNG\r\n\x1a\n\x80\x81 binary\n")
    cut = folder / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "x"}\n' * 200)[:-30])
    return [binary, cut]


def good(folder: Path) -> Path:
    path = folder / "good.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def curate_args(inputs: list[Path], out: Path, stages: str = "['normalize']") -> list[str]:
    return ["data", "curate", "--input", *map(str, inputs), "--out", str(out), "curate.workers=1",
            f"curate.stages={stages}"]


def test_all_inputs_unreadable_is_one_line_error_naming_them(tmp_path, capsys):
    bad = unreadable(tmp_path)
    code = main(curate_args(bad, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("slmforge: error: none of the 2 input files could be read")
    assert all(str(p) in err[-1] for p in bad) and "not UTF-8" in err[-1]
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "curate.json").exists()
    # nothing half-done is left to resume: once the files are fixed, the same out folder just works
    assert not (tmp_path / "out" / ".work").exists()
    bad[0].write_text(TEXTS[0] + "\n", encoding="utf-8")
    assert main(curate_args(bad[:1], tmp_path / "out")) == 0
    # the library call raises the same error
    cfg = config.from_dict(CurateConfig, {"inputs": [{"path": str(bad[1])}], "out": str(tmp_path / "lib"),
                                          "workers": 1, "stages": ["normalize"]})
    with pytest.raises(SlmforgeError, match="cut.jsonl.gz"):
        curate(cfg, show_progress=False)


def test_some_inputs_unreadable_succeeds_and_names_them_on_the_console(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLMFORGE_QUIET", "")  # restored after the test (main sets it for --quiet)
    bad = unreadable(tmp_path)
    inputs = [good(tmp_path), *bad]
    code = main(curate_args(inputs, tmp_path / "out"))
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() == str(tmp_path / "out")
    err = captured.err.splitlines()
    summary = [line for line in err if "skipped" in line]
    assert summary and summary[0].startswith("warning: curate skipped 2 of 3 input files")
    for path in bad:
        assert any(str(path) in line for line in err), path
    assert not any(str(inputs[0]) in line for line in err)  # the good file is not named
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["output"]["documents"] == 2 and report["input"]["bad_file_count"] == 2
    # a warning: said in quiet mode too, where the progress lines are not
    code = main(["--quiet", *curate_args(inputs, tmp_path / "quiet")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: curate skipped 2 of 3" in err and "job filter done" not in err


def test_no_tqdm_bars_on_stderr_of_a_cli_run(tmp_path, capfd, monkeypatch):
    from tqdm import std

    monkeypatch.delenv("SLMFORGE_QUIET", raising=False)
    init = std.tqdm.__dict__["__init__"]
    code = main(curate_args([good(tmp_path)], tmp_path / "out", "['normalize','exact_dedup','near_dedup']"))
    err = capfd.readouterr().err
    assert code == 0
    assert "it/s" not in err and "|█" not in err and "%|" not in err, err
    assert "curate: job exact-find done" in err and "curate: job minhash-clusters done" in err  # ours stay
    assert std.tqdm.__dict__["__init__"] is init  # tqdm is as it was after the run
