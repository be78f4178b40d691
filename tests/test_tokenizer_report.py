"""Tokenizer report: figures checked by hand on hand-built tokenizers."""

from __future__ import annotations

import json

import pytest

from slmforge.tokenizer import tokenizer_report
from slmforge.tokenizer.report import format_table, measure
from slmforge.tokenizer.tokenizer import Tokenizer


def _byte_bpe() -> Tokenizer:
    """BPE with byte fallback: vocab <unk>, 256 bytes, 'a', 'b', 'ab', ' '; one merge a+b."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from slmforge.tokenizer import pretokenize

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "a": 257, "b": 258, "ab": 259, " ": 260}
    backend = Backend(models.BPE(vocab, [("a", "b")], unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(["<unk>"])
    backend.pre_tokenizer = pretokenize.pre_tokenizer("bpe", split_digits=True)
    backend.decoder = pretokenize.decoder("bpe")
    return Tokenizer(backend)


def _word_level() -> Tokenizer:
    """Whole words only, whitespace dropped: '[UNK]', 'ab', 'a'."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({"[UNK]": 0, "ab": 1, "a": 2}, unk_token="[UNK]"))
    backend.add_special_tokens(["[UNK]"])
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)
    return Tokenizer(backend)


# Line 1 "ab ab a ü": 4 words, 10 UTF-8 bytes (ü is 2).
#   byte BPE: "ab" | " " "ab" | " " "a" | " " <0xC3> <0xBC>  = 8 tokens, 2 byte tokens
#   word level: ab ab a [UNK]                                 = 4 tokens, 1 unk
# Line 2 "aab": 1 word, 3 bytes.
#   byte BPE: "a" "ab" (a+b merges first)                     = 2 tokens
#   word level: [UNK]                                          = 1 token, 1 unk
LINES = ["ab ab a ü", "aab"]


def test_measure_hand_counted():
    m = measure(_byte_bpe(), LINES)
    assert (m["lines"], m["words"], m["bytes"], m["tokens"]) == (2, 5, 13, 10)
    assert m["fertility"] == pytest.approx(10 / 5)
    assert m["bytes_per_token"] == pytest.approx(13 / 10)
    assert m["byte_fallback"] == pytest.approx(2 / 10)
    assert m["unk"] == 0.0
    assert m["distinct_tokens"] == 5  # ab, ' ', a, <0xC3>, <0xBC>
    assert m["vocab_used"] == pytest.approx(5 / 261)
    assert m["roundtrip"] == 1.0

    w = measure(_word_level(), LINES)
    assert (w["words"], w["tokens"]) == (5, 5)
    assert w["fertility"] == 1.0
    assert w["bytes_per_token"] == pytest.approx(13 / 5)
    assert w["byte_fallback"] == 0.0
    assert w["unk"] == pytest.approx(2 / 5)
    assert w["vocab_used"] == 1.0
    assert w["roundtrip"] == 0.0  # "ab ab a" lost the ü; "aab" became nothing


def test_report_files_and_table(tmp_path, capsys):
    from slmforge.cli import main

    _byte_bpe().save(tmp_path / "bytes")
    _word_level().save(tmp_path / "words")
    text = tmp_path / "xx.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    hindi = tmp_path / "hi.txt"
    hindi.write_text("हिन्दी\n", encoding="utf-8")  # 1 word, 6 characters, 18 bytes

    report = tokenizer_report([tmp_path / "bytes", tmp_path / "words"], {"xx": text, "hi": hindi},
                              tmp_path / "rep")
    assert report["results"]["bytes"]["xx"]["fertility"] == pytest.approx(2.0)
    assert report["results"]["words"]["xx"]["unk"] == pytest.approx(0.4)
    # Every Devanagari code point is 3 bytes; all unknown to the byte BPE -> 18 byte tokens.
    assert report["results"]["bytes"]["hi"]["tokens"] == 18
    assert report["results"]["bytes"]["hi"]["byte_fallback"] == 1.0
    assert report["results"]["words"]["hi"]["unk"] == 1.0

    saved = json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))
    assert saved["results"] == report["results"]
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report)
    assert "tokens/word" in table and "bytes" in table and "words" in table
    assert "20.0%" in table  # byte-fallback share of 'bytes' on xx
    # Round trips count up to canonical equivalence: NFD input decoded as NFC is the same text.
    from tokenizers import normalizers

    nfc_tok = _byte_bpe()
    nfc_tok.backend.normalizer = normalizers.NFC()
    assert nfc_tok.decode(nfc_tok.encode("u\u0308")) == "\u00fc"
    assert measure(nfc_tok, ["u\u0308"])["roundtrip"] == 1.0

    assert main(["tokenizer", "report", str(tmp_path / "bytes"), str(tmp_path / "words"),
                 "--text", f"xx={text}", "--out", str(tmp_path / "rep2")]) == 0
    assert "2.00" in capsys.readouterr().out
    assert main(["tokenizer", "report", str(tmp_path / "bytes"), "--text", "xx"]) == 2
    assert "expected LANG=FILE" in capsys.readouterr().err
