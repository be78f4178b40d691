"""The README's pipeline, verb by verb through the real command line, on a small bilingual corpus."""

from __future__ import annotations

import json

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
