"""Vocabulary trimming: a tokenizer cut to a corpus encodes that corpus exactly as the full one does,
and a cut model's probabilities over the kept tokens are the full model's, renormalized."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.distill.trim import cut_model
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from slmforge.tokenizer.trim import trim_tokenizer

HINDI = ["हिन्दी भाषा और साहित्य का इतिहास बहुत पुराना है", "भारत में कई भाषाएँ बोली जाती हैं",
         "यह किताब मेरे दोस्त की है", "आज मौसम बहुत अच्छा है और हम बाहर जाएंगे"]
ENGLISH = ["the history of the english language is long", "many languages are spoken in india",
           "this book belongs to my friend", "the weather is nice today and we will go out"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "mixed.txt").write_text("\n".join((HINDI + ENGLISH) * 30) + "\n", encoding="utf-8")
    (folder / "hi.txt").write_text("\n".join(HINDI) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["unigram", "bpe", "bytelevel", "wordpiece"])
def tokenizer(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = TokenizerConfig(kind=request.param, vocab_size=400, min_frequency=1, inputs=[str(corpus / "mixed.txt")])
    return load_tokenizer(train_tokenizer(cfg, out))


def test_a_cut_tokenizer_encodes_its_corpus_exactly_and_other_text_still(tokenizer):
    cut, report = trim_tokenizer(tokenizer, HINDI)
    assert report.vocab_after < report.vocab_before, report
    assert report.changed_documents == 0 and report.covered_tokens == report.corpus_tokens
    for text in HINDI:  # the same token strings, renumbered
        full = [tokenizer.id_to_token(i) for i in tokenizer.encode(text, add_special=True)]
        assert [cut.id_to_token(i) for i in cut.encode(text, add_special=True)] == full
        assert cut.decode(cut.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert cut.roles == tokenizer.roles and cut.bos_id is not None
    # English words were cut: English text still encodes, in other pieces (smaller ones, bytes or unknowns).
    english = [cut.id_to_token(i) for i in cut.encode(ENGLISH[0])]
    assert english and english != [tokenizer.id_to_token(i) for i in tokenizer.encode(ENGLISH[0])]


def test_min_count_drops_rare_tokens_and_reports_what_changed(tokenizer):
    documents = HINDI * 3 + [ENGLISH[0]]  # its tokens occur once: cut at min_count 2
    cut, report = trim_tokenizer(tokenizer, documents, min_count=2)
    full, _ = trim_tokenizer(tokenizer, documents, min_count=1)
    assert report.vocab_after <= full.vocab_size and report.covered_tokens < report.corpus_tokens
    assert report.changed_documents >= 1


@pytest.mark.parametrize("preset", ["bert-tiny", "llama-tiny", "t5-tiny"])
def test_a_cut_model_keeps_the_full_models_probabilities_renormalized(preset, corpus, tmp_path):
    from slmforge.models import build_model, config_from_dict

    tokenizer = load_tokenizer(train_tokenizer(TokenizerConfig(kind="unigram", vocab_size=400, min_frequency=1,
                                                               inputs=[str(corpus / "mixed.txt")]), tmp_path / "tok"))
    cfg = config_from_dict({"preset": preset, "vocab_size": tokenizer.vocab_size})
    model = build_model(cfg, "cpu", seed=0).eval()
    cut_tok, report = trim_tokenizer(tokenizer, HINDI)
    small = cut_model(model, report.kept_ids).eval()
    assert small.cfg.vocab_size == len(report.kept_ids) < cfg.vocab_size
    kept = torch.tensor(report.kept_ids)
    ids = torch.tensor([tokenizer.encode(HINDI[0], add_special=True)])
    new_ids = torch.tensor([cut_tok.encode(HINDI[0], add_special=True)])
    assert torch.equal(kept[new_ids], ids)
    with torch.no_grad():
        if preset == "t5-tiny":
            full = model.logits(model(ids, decoder_input_ids=ids))
            part = small.logits(small(new_ids, decoder_input_ids=new_ids))
        else:
            full, part = model.logits(model(ids)), small.logits(small(new_ids))
    torch.testing.assert_close(part, full[..., kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.softmax(-1), full[..., kept].softmax(-1), rtol=1e-5, atol=1e-6)


def test_trim_vocab_writes_a_run_that_teaches_through_distill(corpus, tmp_path, capsys):
    """A Hugging Face teacher folder (XLM-R layout, as seed 004's) cut to Hindi, then used as the
    teacher of a student trained on data tokenized with the cut tokenizer."""
    transformers = pytest.importorskip("transformers")
    from slmforge import config
    from slmforge.cli import main
    from slmforge.data.prepare import load_config as data_config
    from slmforge.data.prepare import prepare_data
    from slmforge.distill.config import DistillRunConfig
    from slmforge.distill.run import distill

    tokenizer = load_tokenizer(train_tokenizer(TokenizerConfig(kind="unigram", vocab_size=400, min_frequency=1,
                                                               inputs=[str(corpus / "mixed.txt")]), tmp_path / "tok"))
    hf = transformers.XLMRobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=80,
                                       pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                                       eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    transformers.XLMRobertaForMaskedLM(hf).save_pretrained(tmp_path / "teacher")
    tokenizer.save(tmp_path / "teacher")
    assert main(["trim-vocab", str(tmp_path / "teacher"), "--text", str(corpus / "hi.txt"),
                 "--out", str(tmp_path / "teacher-hi")]) == 0
    printed = capsys.readouterr().out
    assert "fewer)" in printed and "0 document(s) now encode differently" in printed
    report = json.loads((tmp_path / "teacher-hi" / "trim_report.json").read_text())
    assert report["parameters_after"] < report["parameters_before"] and report["covered_share"] == 1.0

    data = prepare_data(data_config(None, flags={
        "sources": [{"path": str(corpus / "hi.txt")}], "tokenizer": str(tmp_path / "teacher-hi" / "tokenizer"),
        "out": str(tmp_path / "data"), "workers": 1, "val_fraction": 0.25}), show_progress=False)
    run = distill(config.load(DistillRunConfig, overrides=[
        "model.preset=roberta-tiny", "model.max_seq_len=64", f"train.data={data}", "train.seq_len=8",
        "train.batch_size=2", "train.max_steps=3", "train.eval_every=0", f"distill.teacher={tmp_path / 'teacher-hi'}",
        f"train.out_dir={tmp_path / 'student'}"]))
    meta = json.loads((run / "checkpoints" / "step-000003" / "meta.json").read_text())
    assert meta["distill"]["teacher_family"] == "roberta"


def test_tokens_added_beyond_the_models_vocabulary_are_kept(corpus, tmp_path):
    """A fine-tuned tokenizer's chat markers sit past the model vocabulary's ids; they stay, after it."""
    from slmforge.finetune.vocab import add_special_tokens

    base = load_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1,
                                                          inputs=[str(corpus / "mixed.txt")]), tmp_path / "tok"))
    chat, added = add_special_tokens(base, ("<|im_start|>", "<|im_end|>"), None)
    assert added == [base.vocab_size, base.vocab_size + 1]
    cut, report = trim_tokenizer(chat, HINDI)
    assert report.changed_documents == 0
    assert cut.token_to_id("<|im_end|>") == cut.vocab_size - 1 and report.kept_ids[-2:] == added
    text = "<|im_start|>" + HINDI[0] + "<|im_end|>"
    assert [cut.id_to_token(i) for i in cut.encode(text)] == [chat.id_to_token(i) for i in chat.encode(text)]
