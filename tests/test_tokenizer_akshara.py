"""Akshara-aware tokenizers: segmentation, the assembly merges, whole aksharas after training,
exact round trips and transformers parity, and the report's akshara-split column."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from slmforge.errors import ConfigError
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from slmforge.tokenizer.akshara import (
    akshara_spans,
    aksharas,
    assembly_merges,
    parts,
    split_words,
    units,
)
from slmforge.tokenizer.report import measure

UDHR = Path(__file__).parent / "data" / "udhr"
LANGS = ("hin", "ben", "mar", "tam", "deu", "eng")


def udhr_lines(lang: str) -> list[str]:
    return (UDHR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()


def test_aksharas():
    assert aksharas("क्षत्रिय") == ["क्ष", "त्रि", "य"]
    assert aksharas("हिन्दी भारत") == ["हि", "न्दी", " ", "भा", "र", "त"]
    assert aksharas("स्त्री") == ["स्त्री"] and units("स्त्री") == ["स्", "त्", "री"]
    assert aksharas("ক্ষ্মা অসমীয়া") == ["ক্ষ্মা", " ", "অ", "স", "মী", "য়া"]
    assert aksharas("र्\u200dय") == ["र्\u200dय"]          # ZWJ keeps the conjunct
    assert aksharas("क्\u200cष") == ["क्\u200c", "ष"]     # ZWNJ breaks it
    assert aksharas("க்கு") == ["க்", "கு"]                # Tamil: the pulli does not join (Unicode)
    assert aksharas("Gru\u0308ße") == ["G", "r", "u\u0308", "ß", "e"]
    assert akshara_spans("कि ता") == [(0, 2), (2, 3), (3, 5)]


def test_aksharas_match_the_regex_module_on_udhr():
    """An independent implementation of Unicode's grapheme clusters (with the 15.1 conjunct rule)."""
    regex = pytest.importorskip("regex", reason="the `regex` package is not installed")
    for lang in LANGS:
        text = "\n".join(udhr_lines(lang))
        for form in (text, unicodedata.normalize("NFD", text)):
            assert aksharas(form) == regex.findall(r"\X", form), lang


def test_split_words():
    text = "हिन्दी और"
    assert split_words(text, [(0, 2), (2, 6), (6, 9)]) == set()          # हि | न्दी | ' और'
    assert split_words(text, [(0, 1), (1, 6), (6, 9)]) == {"हिन्दी"}     # ह | िन्दी: a vowel sign cut off
    assert split_words(text, [(0, 3), (3, 6), (6, 9)]) == {"हिन्दी"}     # हिन | ्दी: a conjunct cut
    assert split_words(text, [(0, 6), (6, 9), (7, 8), (7, 8), (8, 9)]) == {"और"}  # byte tokens of र
    assert split_words("ab", [(0, 0), (0, 1), (1, 2)]) == set()          # an empty special token


def _encode(chosen: list[str], merges: list[tuple[str, str]], text: str) -> list[str]:
    vocab = {c: i for i, c in enumerate(sorted({c for a in chosen for c in a}))}
    for piece in [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    return BackendTokenizer(models.BPE(vocab, merges)).encode(text).tokens


def test_assembly_merges_complete_every_akshara_in_any_order():
    """Merges of one akshara (त् + री -> त्री) can fire inside another (स्त्री) first; every akshara
    must still come out whole, however the join merges are ranked."""
    chosen = ["स्त्री", "त्री", "त्र", "स्त", "री", "क्ष", "क्षि", "षि", "कि", "क्", "ज़्या", "या"]
    merges = assembly_merges(chosen)
    assert set(parts("स्त्री")) == {"स्", "त्", "री", "स्त्", "स्त्री"}
    n_unit = sum(len(b) == 1 and unicodedata.category(b).startswith("M") for _, b in merges)
    rng = random.Random(0)
    for _ in range(20):
        joins = merges[n_unit:]
        rng.shuffle(joins)
        order = merges[:n_unit] + joins
        for akshara in chosen:
            assert _encode(chosen, order, akshara) == [akshara], (akshara, order)
        assert _encode(chosen, order, "स्त्रीक्षि") == ["स्त्री", "क्षि"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("akshara") / "udhr.txt"
    path.write_text("\n".join(line for lang in LANGS for line in udhr_lines(lang)) + "\n", encoding="utf-8")
    return path


def _cuts_inside_known_aksharas(tok, lines: list[str]) -> list[tuple[str, list[str]]]:
    """(akshara, tokens) for each token that starts inside an akshara the vocabulary holds whole."""
    vocab = tok.backend.get_vocab()
    found = []
    for line in lines:
        encoding = tok.backend.encode(line, add_special_tokens=False)
        spans = akshara_spans(line)
        starts = {a for a, _ in spans}
        prev_end = None
        for start, end in encoding.offsets:
            if end <= start:
                continue
            if prev_end is not None and (start < prev_end or start not in starts):
                akshara = next(line[a:b] for a, b in spans if a <= start < b)
                if akshara in vocab:
                    found.append((akshara, encoding.tokens))
            prev_end = end
    return found


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_akshara_tokenizer_keeps_known_aksharas_whole(corpus, tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    lines = [line for lang in LANGS for line in udhr_lines(lang)]
    plain = load_tokenizer(train_tokenizer(TokenizerConfig(kind=kind, vocab_size=900, inputs=[str(corpus)]),
                                           tmp_path / "plain"))
    whole = load_tokenizer(train_tokenizer(TokenizerConfig(kind=kind, vocab_size=900, inputs=[str(corpus)],
                                                           akshara=True), tmp_path / "akshara"))
    assert _cuts_inside_known_aksharas(plain, lines)  # the problem, without the option
    assert _cuts_inside_known_aksharas(whole, lines) == []
    # Marks are single-character tokens (to spell aksharas too rare to learn), never the start of a longer one.
    starts_with_mark = [t for t in whole.backend.get_vocab() if unicodedata.category(t[0]).startswith("M")]
    assert starts_with_mark and all(len(t) == 1 for t in starts_with_mark)
    assert whole.vocab_size == 900 and whole.kind == kind
    assert whole.backend.get_added_tokens_decoder() == plain.backend.get_added_tokens_decoder()
    assert whole.encode("<eos>") == [whole.eos_id]  # special tokens are recognised as in plain training
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "akshara"))
    for line in lines + ["  तेज़ी से\tबदलती दुनिया 😀", "অসমীয়া ক্ষ্মা"]:
        ids = whole.encode(line)
        assert whole.decode(ids) == unicodedata.normalize("NFC", line)  # exact, byte fallback for the rest
        assert hf.encode(line, add_special_tokens=False) == ids


def test_akshara_training_is_reproducible_for_bpe(corpus, tmp_path):
    cfg = TokenizerConfig(kind="bpe", vocab_size=700, inputs=[str(corpus)], akshara=True)
    first = train_tokenizer(cfg, tmp_path / "a")
    second = train_tokenizer(cfg, tmp_path / "b")
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_report_counts_words_split_inside_an_akshara(corpus, tmp_path):
    plain = load_tokenizer(train_tokenizer(TokenizerConfig(vocab_size=900, inputs=[str(corpus)]), tmp_path / "p"))
    whole = load_tokenizer(train_tokenizer(TokenizerConfig(vocab_size=900, inputs=[str(corpus)], akshara=True),
                                           tmp_path / "a"))
    hindi = udhr_lines("hin")
    split_plain, split_whole = measure(plain, hindi)["akshara_split"], measure(whole, hindi)["akshara_split"]
    assert split_plain > split_whole > 0  # left: aksharas too rare to learn (seen once, or past the budget)
    vocab = whole.backend.get_vocab()
    for line in hindi:
        for word in split_words(line, whole.backend.encode(line).offsets):
            assert any(len(a) > 1 and a not in vocab for a in aksharas(word)), word
    assert measure(whole, udhr_lines("eng"))["akshara_split"] == 0.0


@pytest.mark.parametrize("kind", ["bytelevel", "wordpiece"])
def test_akshara_option_is_for_bpe_and_unigram(kind):
    with pytest.raises(ConfigError, match="tokenizer.akshara: is for kind 'bpe' or 'unigram'"):
        from slmforge import config

        config.from_dict(TokenizerConfig, {"kind": kind, "akshara": True, "inputs": ["x.txt"]}, "tokenizer")
