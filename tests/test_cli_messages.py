"""What the command line says (issue 23, "Recipes that train as written"): examples that survive the
shell, a misspelled flag or override answered with the verb's usage and the likely meaning, a
generation without text explained, a failed run that leaves no half-made folder, and a report of a
folder that is no run refused."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import pytest
import torch

from conftest import SPECIALS, word_level_tokenizer
from slmforge.cli import OVERRIDE, VERB_CONFIGS, _config_fields, build_parser, main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def every_parser():
    """(verb words, parser) for the top level and every verb and sub-verb."""
    pending = [((), build_parser())]
    while pending:
        words, parser = pending.pop()
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(((*words, name), sub) for name, sub in action.choices.items())


def example_commands(help_text: str) -> list[str]:
    """The command lines a help text shows: lines that start with `slmforge ` (or pipe into it)."""
    commands = []
    for line in help_text.splitlines():
        text = line.strip()
        if text.startswith("slmforge ") or "| slmforge " in text:
            commands.append(text.rsplit("| ", 1)[-1])
    return commands


# ---------------------------------------------------------------- 1. examples survive the shell


def test_every_help_example_survives_the_shell():
    """Each override in each example, as the shell hands it over, is the TOML value the example means:
    `finetune.train_files=["qa.jsonl"]` unquoted reaches the program as `[qa.jsonl]`, which is no list."""
    checked = 0
    for words, parser in every_parser():
        for command in example_commands(parser.format_help()):
            argv = shlex.split(command)  # unbalanced quotes fail here
            assert argv[0] == "slmforge", command
            for word in argv[1:]:
                if not OVERRIDE.match(word):
                    continue
                value = word.split("=", 1)[1]
                if value[:1] in ("[", "{", '"', "'"):
                    try:
                        tomllib.loads(f"v = {value}")
                    except tomllib.TOMLDecodeError:
                        pytest.fail(f"`slmforge {' '.join(words)} --help`: {command!r} passes {word!r} to the "
                                    f"program (the shell ate its quotes)")
                checked += 1
    assert checked > 10


def test_the_finetune_example_keeps_its_list(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    argv = shlex.split(next(c for c in example_commands(capsys.readouterr().out) if "train_files" in c))
    assert 'finetune.train_files=["qa.jsonl"]' in argv


# ---------------------------------------------------------------- 2. export names what loads it


def test_export_help_names_what_loads_each_kind(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "PeftModel"):
        assert name in out, name


# ---------------------------------------------------------------- 3. a misspelled flag


@pytest.mark.parametrize("argv, usage, last", [
    (["generate", "RUN", "--promt", "x"], "usage: slmforge generate",
     "slmforge generate: error: unrecognized arguments: --promt x; did you mean --prompt?"),
    (["pretrain", "--max-steps", "5"], "usage: slmforge pretrain",
     "slmforge pretrain: error: unrecognized arguments: --max-steps 5; did you mean train.max_steps=5?"),
    (["finetune", "--max-steps=5"], "usage: slmforge finetune",
     "slmforge finetune: error: unrecognized arguments: --max-steps=5; did you mean train.max_steps=5?"),
    (["data", "prepare", "--workers", "4"], "usage: slmforge data prepare",
     "slmforge data prepare: error: unrecognized arguments: --workers 4; did you mean data.workers=4?"),
    (["generate", "RUN", "--temperature", "0.7"], "usage: slmforge generate",
     "slmforge generate: error: unrecognized arguments: --temperature 0.7; did you mean temperature=0.7?"),
    (["generate", "RUN", "--bogus"], "usage: slmforge generate",
     "slmforge generate: error: unrecognized arguments: --bogus"),
    (["--bogus", "pretrain"], "usage: slmforge [-h]", "slmforge: error: unrecognized arguments: --bogus"),
    (["pretrain", "--quiet"], "usage: slmforge pretrain",
     "slmforge pretrain: error: unrecognized arguments: --quiet; did you mean slmforge --quiet pretrain ...?"),
    (["finetune", "--train-files", '["a.jsonl"]'], "usage: slmforge finetune",
     "slmforge finetune: error: unrecognized arguments: --train-files [\"a.jsonl\"]; "
     "did you mean finetune.train_files='[\"a.jsonl\"]'?"),
])
def test_a_misspelled_flag_gets_its_verbs_usage_and_the_likely_meaning(argv, usage, last, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert err.strip().splitlines()[-1] == last


def test_every_config_verb_has_its_fields_for_suggestions():
    """VERB_CONFIGS covers each verb that takes key=value words, and names a class with fields."""
    takes_overrides = {" ".join(words) for words, parser in every_parser()
                       if any(a.dest == "overrides" for a in parser._actions)}
    assert takes_overrides == set(VERB_CONFIGS)
    for verb in VERB_CONFIGS:
        assert _config_fields(verb), verb
    assert "train.max_steps" in _config_fields("pretrain") and "tokenizer.vocab_size" in _config_fields("tokenizer train")


# ---------------------------------------------------------------- 4. a misspelled override


@pytest.mark.parametrize("argv, wanted", [
    (["pretrain", "trian.max_steps=5"], "trian: unknown field; did you mean train?"),
    (["pretrain", "train.max_stesp=5"], "train.max_stesp: unknown field; did you mean train.max_steps?"),
    (["finetune", "lroa.rank=4"], "lroa: unknown field; did you mean lora?"),
    (["generate", "missing-run", "-p", "x", "temperatur=0.5"], "temperatur: unknown field; did you mean temperature?"),
])
def test_a_misspelled_override_gets_did_you_mean(argv, wanted, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and wanted in err, err


def test_an_override_of_a_misspelled_section_names_the_one_meant(tmp_path, capsys):
    assert main(["tokenizer", "train", "--out", str(tmp_path / "tok"), "tokenzer.vocab_size=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("slmforge: error: override 'tokenzer.vocab_size=500': only tokenizer.* fields apply here "
                   "(did you mean tokenizer.vocab_size=500?)")


# ---------------------------------------------------------------- 5. a generation without text


WORDS = [f"s{i}" for i in range(16)]


def model_folder(tmp_path, preset: str, extra_meta: dict, sentinels: int = 0):
    """A run folder holding an untrained model of `preset` (checkpoints/step-000000) and its tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from slmforge.checkpoint.writing import write_model_folder
    from slmforge.models import build_model, config_from_dict
    from slmforge.tokenizer import Tokenizer

    run = tmp_path / "run"
    extra = [f"<extra_id_{i}>" for i in range(sentinels)]
    if extra:
        vocab = {t: i for i, t in enumerate([*SPECIALS.values(), *extra, *WORDS])}
        backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.add_special_tokens([*SPECIALS.values(), *extra])
        tokenizer = Tokenizer(backend, roles=dict(SPECIALS), sentinels=extra, meta={"kind": "wordlevel"})
        tokenizer.save(run / "tokenizer")
    else:
        tokenizer = word_level_tokenizer(run / "tokenizer", WORDS)
    model = build_model(config_from_dict({"preset": preset, "vocab_size": tokenizer.vocab_size}), seed=0)
    (run / "checkpoints").mkdir()
    write_model_folder(run / "checkpoints" / "step-000000", model,
                       {"tokenizer_sha256": tokenizer.sha256, **extra_meta})
    (run / "checkpoints" / "latest").write_text("step-000000\n")
    return run, tokenizer


def answer_with(monkeypatch, ids: list[int]):
    """Make the model's answer `ids` (the stop token included), whatever its weights say: each call of
    the output head (one per step for a single prompt) puts all the mass on the next scripted id."""
    from slmforge.models import Decoder
    from slmforge.models.encdec import EncoderDecoder

    script = iter(ids)

    def logits(self, hidden):
        out = torch.full((*hidden.shape[:-1], self.cfg.vocab_size), -1e9)
        out[..., next(script)] = 0.0
        return out

    monkeypatch.setattr(Decoder, "logits", logits)
    monkeypatch.setattr(EncoderDecoder, "logits", logits)


def test_a_model_that_ends_at_once_says_so(tmp_path, monkeypatch, capsys):
    run, tokenizer = model_folder(tmp_path, "test-tiny", {"objective": {"kind": "clm"}, "add_bos": True})
    answer_with(monkeypatch, [tokenizer.eos_id])
    assert main(["generate", str(run), "-p", "s1 s2", "temperature=0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "s1 s2\n\n"
    assert captured.err.strip() == ("note: the model ended at once: its first token was the end-of-sequence token "
                                    "[SEP] (stop_at_eos=false generates past it)")
    answer_with(monkeypatch, [tokenizer.token_to_id("s3"), tokenizer.eos_id])  # a one-word answer: said why
    assert main(["generate", str(run), "-p", "s1 s2", "--json"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)[0]
    assert (row["completion"], row["finish_reason"], row["completion_tokens"]) == ("s3", "stop", 2)  # eos counted
    assert captured.err.strip() == ("note: the model ended its answer after 1 token with [SEP]: it chose to stop "
                                    "there (a longer-trained run writes more; stop_at_eos=false generates past it)")
    s3, s4 = tokenizer.token_to_id("s3"), tokenizer.token_to_id("s4")
    answer_with(monkeypatch, [s3, s4, s3, tokenizer.eos_id])  # an answer of some length: nothing to explain
    assert main(["generate", str(run), "-p", "s1 s2", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["completion"] == "s3 s4 s3" and captured.err == ""


def test_a_span_corruption_model_says_why_it_writes_no_text(tmp_path, monkeypatch, capsys):
    run, tokenizer = model_folder(tmp_path, "t5-tiny", {"objective": {"kind": "span"}, "add_bos": False},
                                  sentinels=4)
    answer_with(monkeypatch, [tokenizer.sentinel_ids[0], tokenizer.eos_id])
    assert main(["generate", str(run), "-p", "s1 s2", "temperature=0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "s1 s2\n\n"
    assert captured.err.strip() == ("note: a span-corruption model answers with sentinels (<extra_id_0> ...), which "
                                    "are not text; fine-tune it (finetune.task = \"translate\") to generate text")
    answer_with(monkeypatch, [tokenizer.sentinel_ids[0], tokenizer.eos_id])
    assert main(["generate", str(run), "-p", "s1 s2", "--json"]) == 0  # the encoder-decoder path's details
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["finish_reason"], row["prompt_tokens"], row["completion_tokens"]) == ("stop", 3, 2)  # s1 s2 </s>


# ---------------------------------------------------------------- 6. a failed run leaves no half-made folder


def finetune_argv(tmp_path, out, *extra):
    tokenizer_dir = tmp_path / "tok"
    if not tokenizer_dir.exists():
        word_level_tokenizer(tokenizer_dir, WORDS)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "s1 s2", "response": "s2 s1"}) + "\n")
    return ["finetune", "model.preset=test-tiny", f"finetune.tokenizer={tokenizer_dir}",
            f'finetune.train_files=["{good}"]', "train.seq_len=32", "train.max_steps=1", "train.device=cpu",
            f"train.out_dir={out}", *extra]


def test_a_finetune_refused_before_its_first_checkpoint_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "qa"
    assert main(finetune_argv(tmp_path, out, "train.seq_len=100")) == 2  # refused: longer than the context
    assert "train.seq_len: 100 exceeds the model's context" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()  # no .lock, no tokenizer/, no runs/

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "s1"}) + "\n")
    assert main(finetune_argv(tmp_path, out, f'finetune.train_files=["{bad}"]')) == 2  # bad examples
    assert "bad.jsonl:1: no field 'response'" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_keeps_a_folder_that_was_there_before(tmp_path, capsys):
    out = tmp_path / "qa"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(finetune_argv(tmp_path, out, "train.seq_len=100")) == 2
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- 7. report refuses a folder inside a run


def test_report_refuses_a_folder_inside_a_run(tmp_path, capsys):
    run = tmp_path / "runs" / "bert"
    (run / "data").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n")
    assert main(["report", str(run / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slmforge: error: {run / 'data'}: not a run folder (no metrics.jsonl, config.toml or "
                   f"checkpoints/) nor a checkpoint folder of one; it lies inside the run folder {run}")
    (run / "checkpoints" / "step-000001").mkdir(parents=True)  # a step folder still reports its run
    from slmforge.report.collect import find_run_dir

    assert find_run_dir(run / "checkpoints" / "step-000001") == run
    assert find_run_dir(run / "checkpoints") == run


def test_a_distill_refused_before_its_first_checkpoint_leaves_no_run_folder(mlm_markov_shards, tmp_path, capsys):
    _, data = mlm_markov_shards
    out = tmp_path / "student"
    assert main(["distill", "model.preset=bert-tiny", f"distill.teacher={tmp_path / 'no-teacher'}", f"train.data={data}",
                 f"train.out_dir={out}", "train.seq_len=16", "train.max_steps=1", "train.device=cpu"]) == 2
    assert "no-teacher" in capsys.readouterr().err
    assert not out.exists()
