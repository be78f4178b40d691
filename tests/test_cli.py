"""The command line: every verb explains itself, and bad input is one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slmforge.cli import build_parser, main

VERBS = ["quickstart", "tokenizer", "data", "pretrain", "eval", "generate", "fill-mask", "export", "import-hf"]


def test_every_pipeline_verb_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(VERBS) <= set(sub.choices)


@pytest.mark.parametrize("argv", [[v, "--help"] for v in VERBS] + [["tokenizer", "train", "--help"],
                                                                   ["data", "prepare", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_show_fields_lists_documented_fields(capsys):
    assert main(["pretrain", "--show-fields"]) == 0
    out = capsys.readouterr().out
    assert "train.seq_len (int, default 256): Tokens per training sequence" in out


def test_show_fields_lists_every_family_and_objective(capsys):
    assert main(["pretrain", "--show-fields"]) == 0
    out = capsys.readouterr().out
    assert "[model] with family = 'bert' | 'roberta' | 'modernbert':" in out
    assert "[objective] with kind = 'mlm':" in out and "objective.mask_rate (float, default 0.15)" in out


def test_list_presets_names_every_family(capsys):
    assert main(["pretrain", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "bert-10m" in out and "modernbert-hindi-33m" in out and "gemma3-270m" in out
    assert "encoder" in out and "decoder" in out


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["pretrain", "model.num_kv_heads=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "slmforge: error: model.num_kv_heads: must divide num_heads (8), got 3"
    assert main(["pretrain", "model.family=gpt2"]) == 2
    assert capsys.readouterr().err.strip() == ("slmforge: error: model.family: must be one of 'llama' | 'gemma3' | "
                                               "'bert' | 'roberta' | 'modernbert', got 'gpt2'")
    assert main(["pretrain", "model.preset=bert-tiny", "model.sliding_window=4"]) == 2
    assert "model.sliding_window: unknown field" in capsys.readouterr().err
    assert main(["pretrain", "objective.kind=mlm", "objective.mask_rate=1.5"]) == 2
    assert "objective.mask_rate: must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing-run"), "-p", "x"]) == 2
    assert "no such run or checkpoint folder" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys):
    # argparse alone would reject `temperature=0.5` after `-p x` as an unrecognized argument
    assert main(["generate", "missing-run", "-p", "x", "temperature=0.5"]) == 2
    assert "no such run or checkpoint folder" in capsys.readouterr().err
    assert main(["generate", "missing-run", "-p", "x", "temperature=-1"]) == 2
    assert "temperature: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "missing-run", "--bogus"])


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "slmforge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout
