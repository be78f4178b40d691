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
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "imported"), "-p", "यह", "temperature=0", "max_new_tokens=8",
                 "stop_at_eos=false"]) == 0
    assert capsys.readouterr().out == trained  # export -> import gives back the same model
    assert (tmp_path / "report" / "report.json").is_file()
