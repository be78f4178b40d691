"""Imported SentencePiece models give SentencePiece's ids on real Indic text typed any way, and the
folder written is stable: loading it finds the sha256 it recorded.

Text: the UDHR excerpts in tests/data/udhr (see its README), as published (some Bengali lines type
ো as ে + া) and fully decomposed (NFD), plus decomposed edge cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from pathlib import Path

import pytest

from slmforge.tokenizer import import_tokenizer, load_tokenizer
from slmforge.tokenizer.tokenizer import stable_json

UDHR = Path(__file__).parent / "data" / "udhr"
LANGS = ("hin", "ben", "mar", "tam", "deu", "eng")
INDIC = ("hin", "ben", "mar", "tam")

# Vowel signs in two parts and nukta letters typed decomposed: SentencePiece composes them.
DECOMPOSED = [
    "ঘ\u09c7\u09beষণা",          # ঘোষণা with ো = ে + া
    "ক\u09c7\u09d7শল",            # কৌশল with ৌ = ে + ৗ
    "க\u0bc6\u0bbeடு",            # கொடு with ொ = ெ + ா
    "ய\u0bc7\u0bbeசனை",           # யோசனை with ோ = ே + ா
    "ப\u0bc6\u0bd7வம்",            # பௌவம் with ௌ = ெ + ௗ
    "र\u093c",                     # ऱ = र + ़
    "ಕ\u0cc6\u0cc2\u0cd5",        # Kannada ೋ in three parts
    "か\u3099な",                  # が = か + ゙
]
# Mark orders SentencePiece keeps as typed (no canonical reordering), which NFC would change:
# Arabic shadda before fatha, Vietnamese dot below after the circumflex, Burmese asat before the dot.
KEPT_ORDER = ["\u0645\u062d\u0645\u0651\u064e\u062f", "Vi\u00ea\u0323t Nam", "\u1019\u103a\u1037"]


def udhr_lines(lang: str) -> list[str]:
    return (UDHR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()


def test_udhr_excerpts_hold_the_cases_under_test():
    bengali = "\n".join(udhr_lines("ben"))
    assert "\u09c7\u09be" in bengali.splitlines()[0]  # ো typed in two parts, as published
    assert "\u09df" in bengali  # precomposed য়, which NFC decomposes
    assert not unicodedata.is_normalized("NFC", "\n".join(udhr_lines("hin")))  # precomposed nukta letters


@pytest.fixture(scope="module")
def udhr_models(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed")
    root = tmp_path_factory.mktemp("spm_udhr")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(line for lang in LANGS for line in udhr_lines(lang)) + "\n", encoding="utf-8")
    models = {}
    for name, kind, byte_fallback in [("unigram", "unigram", False), ("unigram_bytes", "unigram", True),
                                      ("bpe_bytes", "bpe", True)]:
        # The default normalization (nmt_nfkc) composes decomposed vowel signs.
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(root / name), model_type=kind, vocab_size=700,
            character_coverage=1.0, byte_fallback=byte_fallback, hard_vocab_limit=False,
            num_threads=1, minloglevel=2)
        models[name] = root / f"{name}.model"
    return models


@pytest.mark.parametrize("name", ["unigram", "unigram_bytes", "bpe_bytes"])
def test_sentencepiece_ids_on_udhr_lines_as_typed_and_decomposed(udhr_models, name, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(udhr_models[name]))
    tok = load_tokenizer(import_tokenizer(udhr_models[name], tmp_path / "tok"))
    texts = [line for lang in LANGS for line in udhr_lines(lang)]
    texts += [unicodedata.normalize("NFD", line) for lang in INDIC for line in udhr_lines(lang)]
    texts += DECOMPOSED + [" ".join(DECOMPOSED)] + KEPT_ORDER
    for text in texts:
        assert tok.encode(text) == sp.encode(text), text
    # The case from the issue, piece by piece.
    assert [tok.id_to_token(i) for i in tok.encode("ঘ\u09c7\u09beষ")] == sp.encode("ঘ\u09c7\u09beষ", out_type=str)


def test_imported_unigram_loads_without_a_changed_hash(udhr_models, tmp_path, caplog):
    """The scores of an imported Unigram model are exact floats; `tokenizers` reads some back one ulp
    off, so the text first written was not the text a load writes back."""
    out = import_tokenizer(udhr_models["unigram_bytes"], tmp_path / "tok")
    text = (out / "tokenizer.json").read_text(encoding="utf-8")
    recorded = json.loads((out / "slmforge_tokenizer.json").read_text(encoding="utf-8"))["tokenizer_sha256"]
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(out)
    assert "changed after it was written" not in caplog.text
    assert tok.sha256 == recorded == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert tok.backend.to_str(pretty=True) == text  # what `data prepare` hashes is the file itself
    # Saving the loaded tokenizer again writes the same bytes.
    assert (tok.save(tmp_path / "again") / "tokenizer.json").read_text(encoding="utf-8") == text


def test_stable_json_reaches_a_fixed_point():
    from tokenizers import Tokenizer, models

    # Scores as a SentencePiece model stores them (float32 values); these two do not survive
    # one JSON round trip through `tokenizers` unchanged.
    pieces = [("<unk>", 0.0), ("a", -7.2557525634765625), ("b", -7.3052544593811035), ("ab", -2.5)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    first = backend.to_str(pretty=True)
    assert Tokenizer.from_str(first).to_str(pretty=True) != first  # the problem, still present upstream
    text = stable_json(backend)
    assert Tokenizer.from_str(text).to_str(pretty=True) == text
