"""Importing tokenizers: SentencePiece models and HF folders give exactly the original ids."""

from __future__ import annotations

import json
import logging
import unicodedata

import pytest

from slmforge.errors import SlmforgeError
from slmforge.tokenizer import import_tokenizer, load_tokenizer, tokenizer_report

SENTENCES = [unicodedata.normalize("NFC", s) for s in [
    # Hindi
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "मैं कल बाज़ार जाऊँगा और ज़रूरी सामान ख़रीदूँगा।",
    "गंगा नदी हिमालय से निकलती है और बंगाल की खाड़ी में गिरती है।",
    "किसानों को इस साल अच्छी फ़सल की उम्मीद है।",
    # Assamese
    "অসমীয়া ভাষা অসমৰ ৰাজ্যিক ভাষা আৰু ইয়াক বহু লোকে কয়।",
    "মই কাইলৈ গুৱাহাটীলৈ যাম আৰু কিতাপ কিনিম।",
    "ব্ৰহ্মপুত্ৰ নদী অসমৰ মাজেৰে বৈ গৈছে।",
    "আজি বৰষুণ দিছে, সেয়েহে আমি ঘৰতে থাকিম।",
    # English
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can be trained on a single machine.",
    "Rain is expected tomorrow, so take an umbrella with you.",
    "We measured the results twice before writing the report.",
    # German
    "Die Straße in München ist im Winter sehr schön.",
    "Grüße aus Köln: Wir fahren übermorgen nach Düsseldorf.",
    "Das Mädchen läuft schnell über die große Brücke.",
    "Können Sie mir bitte den Weg zum Bahnhof erklären?",
]]
# Encode checks also cover text the model never saw and whitespace SentencePiece collapses.
EXTRA = ["  Grüße   aus\tKöln  ", "emoji 😀 and 中文", "ज़मीन পঢ়ে", "UPPER lower 123"]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed")
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 5) + "\n", encoding="utf-8")
    models = {}
    for name, kind, size, byte_fallback in [("unigram", "unigram", 180, False),
                                            ("bpe_bytes", "bpe", 420, True),
                                            ("unigram_bytes", "unigram", 420, True)]:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(root / name), model_type=kind, vocab_size=size,
            character_coverage=1.0, byte_fallback=byte_fallback, hard_vocab_limit=False,
            num_threads=1, minloglevel=2)
        models[name] = root / f"{name}.model"
    return models


@pytest.mark.parametrize("name", ["unigram", "bpe_bytes", "unigram_bytes"])
def test_sentencepiece_model_gives_sentencepiece_ids(spm_models, name, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_models[name]))
    tok = load_tokenizer(import_tokenizer(spm_models[name], tmp_path / "tok"))
    for text in SENTENCES + EXTRA:
        assert tok.encode(text) == sp.encode(text), text
        if sp.unk_id() not in sp.encode(text):
            assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.unk_id == sp.unk_id() and tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id()
    assert tok.encode(SENTENCES[0], add_special=True) == [sp.bos_id()] + sp.encode(SENTENCES[0])
    meta = json.loads((tmp_path / "tok" / "slmforge_tokenizer.json").read_text(encoding="utf-8"))
    assert meta["source"]["format"] == "sentencepiece" and meta["kind"] in ("unigram", "bpe")


def test_sentencepiece_folder_with_hf_class_matches_transformers(spm_models, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    src = tmp_path / "xlmr"
    src.mkdir()
    (src / "sentencepiece.bpe.model").write_bytes(spm_models["unigram_bytes"].read_bytes())
    (src / "tokenizer.model").write_bytes(spm_models["unigram_bytes"].read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}),
                                               encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(src))
    assert hf.unk_token_id not in hf.encode(SENTENCES[0] + SENTENCES[8])  # a real conversion
    tok = load_tokenizer(import_tokenizer(src, tmp_path / "tok"))
    for text in SENTENCES + EXTRA:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special=True) == hf.encode(text), text
    # XLM-R's fairseq layout: <s>=0 <pad>=1 </s>=2 <unk>=3, SentencePiece ids shifted by one.
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id == hf.mask_token_id
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again.encode(SENTENCES[4]) == hf.encode(SENTENCES[4])


def _bert_vocab(folder, lowercase):
    from tokenizers import BertWordPieceTokenizer

    bert = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=False)
    bert.train_from_iterator(SENTENCES * 3, vocab_size=700, show_progress=False)
    folder.mkdir(parents=True)
    bert.save_model(str(folder))
    return folder / "vocab.txt"


@pytest.mark.parametrize("uncased", [True, False])
def test_bert_folder_matches_transformers(tmp_path, uncased, caplog):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    vocab = _bert_vocab(tmp_path / "vocab", lowercase=uncased)
    src = tmp_path / "bert"
    # Positional vocab path: `vocab_file` in transformers 4, `vocab` in 5.
    transformers.BertTokenizerFast(str(vocab), do_lower_case=uncased).save_pretrained(str(src))
    hf = transformers.AutoTokenizer.from_pretrained(str(src))
    assert len(hf) == len(vocab.read_text(encoding="utf-8").splitlines())  # the real vocabulary
    with caplog.at_level(logging.WARNING):
        out = import_tokenizer(src, tmp_path / "tok")
    tok = load_tokenizer(out)
    for text in SENTENCES + EXTRA:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special=True) == hf.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id) == (
        hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.unk_token_id, hf.mask_token_id)
    assert tok.kind == "wordpiece"
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.encode(SENTENCES[0]) == hf.encode(SENTENCES[0])
    assert again.cls_token == hf.cls_token
    warned = "deletes combining marks" in caplog.text
    meta = json.loads((out / "slmforge_tokenizer.json").read_text(encoding="utf-8"))
    assert warned == uncased == bool(meta.get("warnings"))
    if uncased:  # the real behavior of uncased BERT: nonspacing marks (virama, nukta, ...) are gone
        assert tok.backend.normalizer.normalize_str("हिन्दी") == "हिनदी"          # न्द -> नद
        assert tok.backend.normalizer.normalize_str("ज़रूरी") == "जररी"            # nukta, ू gone
    else:
        assert tok.unk_id not in tok.encode(SENTENCES[0]) and tok.decode(tok.encode("हिन्दी")) == "हिन्दी"


def test_vocab_txt_folder_goes_through_transformers(tmp_path):
    """An old-style folder (vocab.txt + tokenizer_config.json, no tokenizer.json)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    vocab = _bert_vocab(tmp_path / "src", lowercase=False)
    (vocab.parent / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False}), encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(vocab.parent))
    assert len(hf) == len(vocab.read_text(encoding="utf-8").splitlines())
    tok = load_tokenizer(import_tokenizer(vocab.parent, tmp_path / "tok"))
    for text in SENTENCES + EXTRA:
        assert tok.encode(text, add_special=True) == hf.encode(text), text
    assert tok.unk_id not in tok.encode(SENTENCES[0])  # cased: Hindi words are in the vocabulary


def test_reimporting_our_folder_keeps_its_record(tmp_path):
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer

    first = train_tokenizer(TokenizerConfig(vocab_size=400, num_sentinels=1), tmp_path / "a", SENTENCES)
    again = load_tokenizer(import_tokenizer(first, tmp_path / "b"))
    meta = json.loads((tmp_path / "b" / "slmforge_tokenizer.json").read_text(encoding="utf-8"))
    assert again.sha256 == load_tokenizer(first).sha256
    assert meta["sample"]["sentences"] == len(SENTENCES) and meta["source"]["format"] == "tokenizer.json"
    assert again.sentinel_ids == load_tokenizer(first).sentinel_ids


def test_tokenizer_json_only_folder_without_transformers(tmp_path):
    """Plain `tokenizers` output plus special_tokens_map.json: no transformers needed."""
    from tokenizers import BertWordPieceTokenizer

    bert = BertWordPieceTokenizer(lowercase=True)  # strip_accents follows lowercase, as in BERT
    bert.train_from_iterator(SENTENCES * 3, vocab_size=500, show_progress=False)
    src = tmp_path / "src"
    src.mkdir()
    bert.save(str(src / "tokenizer.json"))
    (src / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
         "mask_token": {"content": "[MASK]", "lstrip": True}}), encoding="utf-8")
    tok = load_tokenizer(import_tokenizer(src, tmp_path / "tok"))
    assert tok.encode(SENTENCES[8]) == bert.encode(SENTENCES[8], add_special_tokens=False).ids
    assert tok.bos_id == bert.token_to_id("[CLS]") and tok.mask_id == bert.token_to_id("[MASK]")
    # The report makes the damage visible.
    text = tmp_path / "hi.txt"
    text.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    report = tokenizer_report([tmp_path / "tok"], {"hi": text})
    assert report["tokenizers"]["tok"]["strips_marks"] is True
    assert report["results"]["tok"]["hi"]["roundtrip"] == 0.0


def test_import_errors(tmp_path):
    with pytest.raises(SlmforgeError, match="not found"):
        import_tokenizer(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmforgeError, match="no tokenizer.json and no SentencePiece"):
        import_tokenizer(tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff")
    pytest.importorskip("sentencepiece", reason="sentencepiece not installed")
    with pytest.raises(SlmforgeError, match="bad.model: not a SentencePiece model"):
        import_tokenizer(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import(spm_models, tmp_path, capsys):
    from slmforge.cli import main

    assert main(["tokenizer", "import", str(spm_models["bpe_bytes"]), "--out", str(tmp_path / "tok")]) == 0
    assert "kind='bpe'" in capsys.readouterr().out
    assert main(["tokenizer", "import", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope: not found" in capsys.readouterr().err
