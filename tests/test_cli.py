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
                                               "'qwen3' | 'smollm3' | 'bert' | 'roberta' | 'modernbert' | 't5' | 'encdec', got 'gpt2'")
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


CONFIG_VERBS = {("tokenizer", "train"): "tokenizer", ("data", "prepare"): "data", ("pretrain",): None}


@pytest.mark.parametrize("verb", list(CONFIG_VERBS))
def test_help_examples_name_real_presets_recipes_and_the_verbs_own_sections(verb, capsys):
    import re
    from pathlib import Path

    from slmforge.models.presets import PRESETS

    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    presets = re.findall(r"model\.preset=([\w.-]+)", text)
    assert all(p.rstrip(";,.") in PRESETS for p in presets), presets
    root = Path(__file__).resolve().parents[1]
    for recipe in re.findall(r"recipes/[\w.-]+\.toml", text):
        assert (root / recipe).is_file(), recipe
    section = CONFIG_VERBS[verb]
    if section:  # tokenizer train / data prepare take only their own section's overrides
        assert set(re.findall(r"\b([a-z]+)\.[a-z_]+=", text)) - {"key"} == {section}, text


def test_list_presets_shows_small_models_and_sizes_match_names(capsys):
    import re

    from slmforge.models import config_from_dict
    from slmforge.models.presets import PRESETS

    assert main(["pretrain", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert " 0.0M" not in out and re.search(r"test-tiny .* 20\.\dk params", out)
    for name in PRESETS:  # a preset named for its size has that size (llama-50m had 40.0M)
        if m := re.search(r"-(\d+)m$", name):
            size = config_from_dict({"preset": name}).num_parameters() / 1e6
            assert abs(size - int(m.group(1))) <= 0.1 * int(m.group(1)), (name, size)


def test_override_errors_name_the_field_not_the_config_file(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nmax_steps = 10\n")
    assert main(["pretrain", "-c", str(recipe), "model.num_kv_heads=3"]) == 2
    assert capsys.readouterr().err.strip() == "slmforge: error: model.num_kv_heads: must divide num_heads (8), got 3"
    recipe.write_text("[train]\nmax_steps = -1\n")
    assert main(["pretrain", "-c", str(recipe)]) == 2
    assert f"{recipe}: train.max_steps: must be positive" in capsys.readouterr().err


def test_a_misspelled_section_is_refused_by_every_verb(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[tokenizer]\nvocab_size = 300\ninputs = ["x.txt"]\n\n[trian]\nmax_steps = 5\n')
    for argv in (["tokenizer", "train", "-c", str(recipe), "--out", str(tmp_path / "tok")],
                 ["data", "prepare", "-c", str(recipe)], ["pretrain", "-c", str(recipe)]):
        assert main(argv) == 2, argv
        assert f"{recipe}: [trian]: unknown section; did you mean [train]?" in capsys.readouterr().err, argv
    assert not (tmp_path / "tok").exists()


def test_recipe_sections_are_every_verbs_sections():
    import dataclasses

    from slmforge.config import RECIPE_SECTIONS
    from slmforge.distill.config import DistillRunConfig
    from slmforge.finetune.config import FinetuneConfig
    from slmforge.train.config import PretrainConfig

    verbs = {f.name for cls in (PretrainConfig, FinetuneConfig, DistillRunConfig) for f in dataclasses.fields(cls)}
    assert set(RECIPE_SECTIONS) - {"curate", "pairs"} == {"tokenizer", "data"} | verbs


def test_output_piped_into_head_stops_quietly(monkeypatch, capsys):
    """`slmforge ... | head -1`: the reader leaves early and the next write fails with a broken pipe;
    the command stops with the shell's 141 (SIGPIPE) and no traceback."""
    from slmforge.train import commands

    def writes_into_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(commands, "_run", writes_into_a_closed_pipe)
    assert main(["pretrain", "--list-presets"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_process_that_lost_its_peers_says_so_in_one_line(monkeypatch, capsys):
    """Under torchrun a rank whose peer died gets a collective's error; it prints one line naming its
    rank, not a traceback (the failing rank's own message says why). Outside a job, errors are untouched."""
    from slmforge.cli import lost_peer

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:5; "
                        "Connection reset by peer\nException raised from ...")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert lost_peer(gloo) is None  # one process: not a job's error
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert lost_peer(RuntimeError("shape mismatch")) is None  # a real bug keeps its traceback

    from slmforge.train import commands

    def fail(args):
        raise gloo

    monkeypatch.setattr(commands, "_run", fail)  # what the pretrain verb runs
    assert main(["pretrain"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slmforge: error: rank 1: lost contact with the other processes")
    assert "Connection reset by peer" in err and "run the same command to resume" in err


def test_a_signal_stop_is_said_once(monkeypatch, capsys):
    from slmforge.train import commands
    from slmforge.train.signals import StopRequested

    def stopped(args):
        raise StopRequested("terminated (SIGTERM): saved run/checkpoints/step-000004; run the same command", 143)

    monkeypatch.setattr(commands, "_run", stopped)
    assert main(["pretrain"]) == 143
    assert capsys.readouterr().err == ""  # the trainer printed it already (rank 0)

    def interrupted(args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(commands, "_run", interrupted)
    assert main(["pretrain"]) == 130
    assert capsys.readouterr().err == "slmforge: interrupted\n"
