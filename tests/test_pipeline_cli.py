"""The README's pipeline, verb by verb through the real command line, on a small bilingual corpus."""

from __future__ import annotations

import json
import re

import pytest

from slmforge.cli import main

HINDI = ["यह एक छोटा वाक्य है।", "हिन्दी भाषा में लिखा गया पाठ।", "हम आज बाज़ार जाएँगे।", "किताब मेज़ पर रखी है।"]
ENGLISH = ["This is a short sentence.", "The model learns from text.", "We will go to the market today.",
           "The book is on the table."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "hi.txt").write_text("\n".join(HINDI * 60) + "\n", encoding="utf-8")
    (root / "en.txt").write_text("\n".join(ENGLISH * 60) + "\n", encoding="utf-8")
    return root


def test_tokenizer_data_pretrain_eval_generate_export_import(corpus, tmp_path, capsys):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert main(["tokenizer", "train", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--out", str(tok), "tokenizer.vocab_size=400"]) == 0
    assert main(["tokenizer", "report", str(tok), "--text", f"hi={corpus / 'hi.txt'}",
                 "--text", f"en={corpus / 'en.txt'}", "--out", str(tmp_path / "report")]) == 0
    assert main(["data", "prepare", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--tokenizer", str(tok), "--out", str(data)]) == 0
    assert main(["pretrain", f"train.data={data}", f"train.out_dir={run}", "model.preset=test-tiny",
                 "train.seq_len=32", "train.batch_size=8", "train.max_steps=40", "optim.lr=3e-3",
                 "schedule.warmup_steps=5", "train.eval_every=20"]) == 0
    assert main(["eval", str(run), "--text", f"hi={corpus / 'hi.txt'}"]) == 0
    report = json.loads((run / "checkpoints" / "step-000040" / "eval.json").read_text(encoding="utf-8"))
    assert 0 < report["hi"]["bpb"] < 8
    capsys.readouterr()
    # stop_at_eos=false: a 40-step model may well put eos first; the point is the same text below
    assert main(["generate", str(run), "-p", "यह", "temperature=0", "max_new_tokens=8", "stop_at_eos=false"]) == 0
    trained = capsys.readouterr().out
    assert trained.startswith("यह")
    assert main(["fill-mask", str(run), "यह [MASK] है"]) == 2  # a decoder does not fill masks
    assert "use `slmforge generate" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "imported"), "-p", "यह", "temperature=0", "max_new_tokens=8",
                 "stop_at_eos=false"]) == 0
    assert capsys.readouterr().out == trained  # export -> import gives back the same model
    assert (tmp_path / "report" / "report.json").is_file()


BERT_TOKENIZER = ["tokenizer.kind=wordpiece", "tokenizer.vocab_size=300", "tokenizer.lowercase=true",
                  "tokenizer.pad=[PAD]", "tokenizer.bos=[CLS]", "tokenizer.eos=[SEP]", "tokenizer.unk=[UNK]",
                  "tokenizer.mask=[MASK]"]


@pytest.fixture(scope="module")
def encoder_run(corpus, tmp_path_factory):
    """tokenizer train (WordPiece with BERT's specials) -> data prepare -> pretrain a tiny BERT (MLM)."""
    root = tmp_path_factory.mktemp("encoder")
    tok, data, run = root / "tok", root / "data", root / "run"
    assert main(["tokenizer", "train", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--out", str(tok), *BERT_TOKENIZER]) == 0
    assert main(["data", "prepare", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--tokenizer", str(tok), "--out", str(data)]) == 0
    assert main(["pretrain", f"train.data={data}", f"train.out_dir={run}", "model.preset=bert-tiny",
                 "train.seq_len=32", "train.batch_size=8", "train.max_steps=60", "optim.lr=2e-3",
                 "schedule.warmup_steps=5", "train.eval_every=30", "objective.mask_rate=0.3"]) == 0
    return run


def test_encoder_pipeline_eval_fill_mask_and_one_line_refusals(encoder_run, corpus, capsys):
    run = encoder_run
    meta = json.loads((run / "checkpoints" / "step-000060" / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"]["family"] == "bert" and meta["objective"]["kind"] == "mlm"
    capsys.readouterr()
    assert main(["eval", str(run), "--text", f"hi={corpus / 'hi.txt'}", "--text", f"en={corpus / 'en.txt'}",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for lang in ("hi", "en"):
        assert "bpb" not in rows[lang] and 0 <= rows[lang]["accuracy"] <= 1
        assert rows[lang]["ppl"] == pytest.approx(2.718281828 ** rows[lang]["loss"], rel=1e-6)
    assert main(["eval", str(run), "--text", f"en={corpus / 'en.txt'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["en"] == rows["en"]  # fixed masking seed: same figures
    assert main(["fill-mask", str(run), "the book is on the [MASK].", "--top-k", "3", "--json"]) == 0
    guesses = json.loads(capsys.readouterr().out)
    assert len(guesses) == 1 and len(guesses[0]) == 3
    assert guesses[0][0]["probability"] >= guesses[0][1]["probability"] >= guesses[0][2]["probability"]
    assert main(["fill-mask", str(run), "[MASK] एक छोटा [MASK] है।"]) == 0
    assert capsys.readouterr().out.count("mask ") == 2
    assert main(["fill-mask", str(run), "no mask here"]) == 2
    assert "no mask in the text" in capsys.readouterr().err
    assert main(["generate", str(run), "-p", "the"]) == 2
    assert "use `slmforge fill-mask" in capsys.readouterr().err


def test_several_texts_fill_in_batches_as_each_does_alone(encoder_run, tmp_path, capsys):
    texts = ["the book is on the [MASK].", "[MASK] एक छोटा [MASK] है।", "we will go to the [MASK] today.",
             "[MASK]"]
    alone = []
    for text in texts:
        assert main(["fill-mask", str(encoder_run), text, "--json"]) == 0
        alone.append(json.loads(capsys.readouterr().out))
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n", encoding="utf-8")
    for argv, expected in ((texts, alone), (["--input", str(lines)], alone),  # the blank line is skipped
                           ([texts[0], "--input", str(lines), "--batch-size", "2"], [alone[0]] + alone)):
        assert main(["fill-mask", str(encoder_run), *argv, "--json"]) == 0
        batched = json.loads(capsys.readouterr().out)
        assert len(batched) == len(expected)
        for ours, theirs in zip(batched, expected):
            assert [[g["id"] for g in m] for m in ours] == [[g["id"] for g in m] for m in theirs]
            for a, b in zip(sum(ours, []), sum(theirs, [])):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert main(["fill-mask", str(encoder_run), "a [MASK]", "no mask"]) == 2
    assert "no mask in text 2" in capsys.readouterr().err
    assert main(["fill-mask", str(encoder_run)]) == 2
    assert "give a text with [MASK]" in capsys.readouterr().err


def test_exported_encoder_fills_masks_like_transformers_pipeline(encoder_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(encoder_run), "--format", "hf", "--out", str(out)]) == 0
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    for text in ("the book is on the [MASK].", "[MASK] एक छोटा वाक्य है।", "we will go to the [MASK] today."):
        capsys.readouterr()
        assert main(["fill-mask", str(encoder_run), text, "--top-k", "5", "--json"]) == 0
        ours = json.loads(capsys.readouterr().out)[0]
        theirs = fill(text.replace("[MASK]", fill.tokenizer.mask_token), top_k=5)
        assert [g["id"] for g in ours] == [g["token"] for g in theirs], text
        for a, b in zip(ours, theirs):
            assert a["probability"] == pytest.approx(b["score"], abs=1e-5)
    assert main(["import-hf", str(out), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    assert main(["fill-mask", str(tmp_path / "back"), "the book is on the [MASK].", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0][0]["id"] == ours_first(encoder_run, capsys)


def ours_first(run, capsys) -> int:
    assert main(["fill-mask", str(run), "the book is on the [MASK].", "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0][0]["id"]


def test_an_imported_encoder_trains_further(encoder_run, corpus, tmp_path):
    """Seed 001's second part: an existing (here: exported, then imported) encoder continues MLM training
    on new data prepared with its own tokenizer."""
    hf, imported, data, run = tmp_path / "hf", tmp_path / "imported", tmp_path / "data", tmp_path / "more"
    assert main(["export", str(encoder_run), "--format", "hf", "--out", str(hf)]) == 0
    assert main(["import-hf", str(hf), "--out", str(imported)]) == 0
    assert main(["data", "prepare", "--input", str(corpus / "en.txt"), "--tokenizer", str(imported / "tokenizer"),
                 "--out", str(data)]) == 0
    assert main(["pretrain", f"train.data={data}", f"train.out_dir={run}", f"train.init_from={imported}",
                 "train.seq_len=32", "train.batch_size=8", "train.max_steps=5", "train.eval_every=0"]) == 0
    meta = json.loads((run / "checkpoints" / "step-000005" / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"]["family"] == "bert" and meta["objective"]["kind"] == "mlm"


# ---------------------------------------------------------------- what a new user hits (issue 13)

TINY = ["model.preset=test-tiny", "train.seq_len=32", "train.batch_size=4", "train.max_steps=3",
        "train.eval_every=0", "train.log_every=1", "train.device=cpu"]


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    """tokenizer -> data -> a 3-step run; tests that damage it work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    assert main(["tokenizer", "train", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--out", str(root / "tok"), "tokenizer.vocab_size=300"]) == 0
    assert main(["data", "prepare", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "--tokenizer", str(root / "tok"), "--out", str(root / "data"), "data.val_documents=40"]) == 0
    assert main(["pretrain", f"train.data={root / 'data'}", f"train.out_dir={root / 'run'}", *TINY]) == 0
    return root


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / folder.name)


def test_a_run_and_its_data_work_from_any_folder_and_move_together(corpus, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    assert main(["tokenizer", "train", "--input", str(corpus / "hi.txt"), "--out", "runs/my/tokenizer",
                 "tokenizer.vocab_size=300"]) == 0
    assert main(["data", "prepare", "--input", str(corpus / "hi.txt"), "--tokenizer", "runs/my/tokenizer",
                 "--out", "runs/my/data", "data.val_documents=40"]) == 0
    manifest = json.loads((tmp_path / "runs/my/data/manifest.json").read_text(encoding="utf-8"))
    assert manifest["tokenizer"]["path"] == "../tokenizer"  # relative to the data folder
    (tmp_path / "bad").mkdir()
    monkeypatch.chdir(tmp_path / "bad")
    assert main(["pretrain", "train.data=../runs/my/data", "train.out_dir=../runs/my", *TINY]) == 0
    meta = json.loads((tmp_path / "runs/my/checkpoints/step-000003/meta.json").read_text(encoding="utf-8"))
    assert meta["data"] == "data"  # relative to the run folder
    capsys.readouterr()
    assert main(["eval", "../runs/my"]) == 0  # finds the data it trained on
    assert "data:val" in capsys.readouterr().out
    # move run and data together, work from yet another folder
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["eval", "../moved/my", "--json"]) == 0
    assert main(["pretrain", "train.data=../moved/my/data", "train.out_dir=../moved/again", *TINY]) == 0
    # a data folder that is gone is named, with the fix (not "run data prepare")
    shutil.rmtree(tmp_path / "moved/my/data")
    capsys.readouterr()
    assert main(["eval", "../moved/my"]) == 2
    assert "pass --data DIR" in capsys.readouterr().err


def test_a_retrained_tokenizer_is_never_swapped_in_silently(corpus, tiny_run, tmp_path, capsys):
    root = tiny_run
    tok, data = copy_of(root / "tok", tmp_path), copy_of(root / "data", tmp_path)
    before = (tok / "tokenizer.json").read_bytes()
    capsys.readouterr()
    retrain = ["tokenizer", "train", "--input", str(corpus / "en.txt"), "--out", str(tok),
               "tokenizer.vocab_size=280"]
    assert main(retrain) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err
    assert (tok / "tokenizer.json").read_bytes() == before
    assert main([*retrain, "--force"]) == 0
    capsys.readouterr()
    # the data was made with the old one (the manifest's sha256); pretrain refuses the new one
    assert main(["pretrain", f"train.data={data}", f"train.out_dir={tmp_path / 'refused'}", *TINY]) == 2
    assert "differs from the" in capsys.readouterr().err
    # a run whose tokenizer/ was replaced refuses to decode with it
    run = copy_of(root / "run", tmp_path)
    for name in ("tokenizer.json", "slmforge_tokenizer.json"):
        (run / "tokenizer" / name).write_bytes((tok / name).read_bytes())
    for argv in (["generate", str(run), "-p", "यह", "max_new_tokens=3"],
                 ["eval", str(run), "--text", f"hi={corpus / 'hi.txt'}"],
                 ["export", str(run), "--out", str(tmp_path / "hf")]):
        assert main(argv) == 2, argv
        assert "this model was trained with" in capsys.readouterr().err


def test_eval_results_accumulate_keyed_by_what_was_evaluated(corpus, tiny_run, tmp_path, capsys):
    run = copy_of(tiny_run / "run", tmp_path)
    assert main(["eval", str(run), "--text", f"hi={corpus / 'hi.txt'}"]) == 0
    assert main(["eval", str(run), "--text", f"en={corpus / 'en.txt'}"]) == 0
    report = json.loads((run / "checkpoints" / "step-000003" / "eval.json").read_text(encoding="utf-8"))
    assert set(report) == {"hi", "en"}  # the second eval did not overwrite the first
    assert report["hi"]["text"] == str(corpus / "hi.txt") and report["en"]["bpb"] > 0
    assert main(["eval", str(run), "--data", str(tiny_run / "data")]) == 0
    report = json.loads((run / "checkpoints" / "step-000003" / "eval.json").read_text(encoding="utf-8"))
    assert set(report) == {"hi", "en", "data:val"} and report["data:val"]["split"] == "val"
    assert not (run / "eval.json").exists()  # one place: the checkpoint folder


def test_non_finite_weights_are_refused_naming_the_tensor(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = copy_of(tiny_run / "run", tmp_path)
    weights = run / "checkpoints" / "step-000003" / "model.safetensors"
    tensors = load_file(weights)
    tensors["layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, weights)
    capsys.readouterr()
    commands = (["eval", str(run)], ["generate", str(run), "-p", "यह", "max_new_tokens=3"],
                ["export", str(run), "--out", str(tmp_path / "hf")])
    for argv in commands:  # the checksums written with the checkpoint tell first
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(r"model\.safetensors has [\d,]+ bytes, [\d,]+ were written: the checkpoint is damaged", err)
        assert "Traceback" not in err
    (weights.parent / "checksums.json").unlink()  # a folder without checksums (older, or made by hand)
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "layers.1.mlp.up_proj.weight has 1 non-finite value" in err and "Traceback" not in err


def test_overrides_after_input_are_overrides(corpus, tmp_path):
    tok, data = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--input", str(corpus / "hi.txt"), str(corpus / "en.txt"),
                 "tokenizer.vocab_size=290", "--out", str(tok)]) == 0
    assert json.loads((tok / "slmforge_tokenizer.json").read_text(encoding="utf-8"))["config"]["vocab_size"] == 290
    assert main(["data", "prepare", "--tokenizer", str(tok), "--out", str(data), "--input", str(corpus / "hi.txt"),
                 "data.val_fraction=0.2"]) == 0
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["val_fraction"] == 0.2 and len(manifest["sources"]) == 1


def test_generate_and_eval_flags_are_checked_and_named(tiny_run, capsys, monkeypatch):
    import io

    from slmforge.inference.generate import read_prompt

    run = tiny_run / "run"
    capsys.readouterr()
    assert main(["generate", str(run), "-p", "यह", "-n", "0"]) == 2
    assert "--num-samples: must be at least 1" in capsys.readouterr().err
    for verb in (["eval", str(run)], ["generate", str(run), "-p", "x"]):
        assert main([*verb, "--device", "tpu9"]) == 2
        err = capsys.readouterr().err
        assert "--device: unknown device 'tpu9'" in err and "train.device" not in err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert read_prompt(Terminal("यह")) == "यह"
    assert "reading the prompt from standard input (Ctrl-D to end" in capsys.readouterr().err
    assert read_prompt(io.StringIO("piped")) == "piped"  # a pipe: no message
    assert capsys.readouterr().err == ""
    assert read_prompt(io.StringIO("The site\n")) == "The site"  # echo's newline is not the prompt's
    assert read_prompt(io.StringIO("two\nlines\n\n")) == "two\nlines\n"  # only the one echo adds
