"""Readers: every format yields the same documents, bad units are counted exactly, positions resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from slmforge import config
from slmforge.text.sources import ReadStats, SourceConfig, SourceReader, iter_documents
from slmforge.errors import ConfigError, SlmforgeError

DOCS = ["অসমীয়া ভাষা", "हिन्दी भाषा है", "plain English", "Grüße aus Köln", "x" * 3000]


def read(path: Path | str, **fields) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    docs = list(iter_documents(SourceConfig(path=str(path), **fields), stats))
    return docs, stats


def write_zst(path: Path, data: bytes) -> None:
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def test_text_lines_count_bad_units_per_reason_and_file(tmp_path):
    raw = ("\ufeffgood one\n"           # 1: a byte order mark is dropped
           "\n"                         # 2: empty
           "   \n"                      # 3: whitespace only is empty too
           ).encode() + b"bad \xff byte\n" + (  # 4: invalid UTF-8
           "second\r\n"                 # 5: CRLF ending removed
           "").encode() + b"\xc3\n" + "last no newline".encode()  # 6: truncated sequence, 7
    path = tmp_path / "a.txt"
    path.write_bytes(raw)
    docs, stats = read(path)
    assert docs == ["good one", "second", "last no newline"]
    assert stats.documents == 3
    assert stats.skipped == {"empty": 2, "invalid_utf8": 2}
    assert stats.files[str(path)] == {"documents": 3, "text_unit": "line", "skipped": {  # auto chose line
        "empty": {"count": 2, "first_line": 2}, "invalid_utf8": {"count": 2, "first_line": 4}}}


def test_paragraph_and_file_units(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\n\nfirst para\nline two\n\n\n\nsecond\n\nbad \xfe here\nok\n\nthird")
    docs, stats = read(path, text_unit="paragraph")
    assert docs == ["first para\nline two", "second", "third"]
    assert stats.skipped == {"invalid_utf8": 1}
    assert stats.files[str(path)]["skipped"]["invalid_utf8"]["first_line"] == 10
    whole = tmp_path / "whole.txt"
    whole.write_text("one\n\ntwo\n", encoding="utf-8")
    assert read(whole, text_unit="file")[0] == ["one\n\ntwo\n"]
    with pytest.raises(SlmforgeError, match="invalid_utf8"):  # the only file is skipped: nothing left
        read(path, text_unit="file")


def test_jsonl_counts_bad_json_missing_field_and_types(tmp_path):
    lines = [
        json.dumps({"text": "ok one"}),
        "{broken json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": None}),
        json.dumps({"text": 42}),
        json.dumps({"text": "  "}),
        "",
        json.dumps(["not", "an", "object"]),
        '{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "emoji \U0001F600 pair is fine"}),
        json.dumps({"text": "ok two", "other": 1}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(lines).encode() + b'\n{"text": "bad \xff"}\n')
    docs, stats = read(path)
    assert docs == ["ok one", "emoji \U0001F600 pair is fine", "ok two"]
    assert stats.skipped == {"bad_json": 2, "missing_field": 2, "not_text": 1, "empty": 2,
                             "invalid_utf8": 2}
    first = {r: s["first_line"] for r, s in stats.files[str(path)]["skipped"].items()}
    assert first == {"bad_json": 2, "missing_field": 3, "not_text": 5, "empty": 6, "invalid_utf8": 9}
    with pytest.raises(SlmforgeError, match=r"d\.jsonl: no documents .*7 missing_field, 1 not_text"):
        read(path, text_field="other")


def test_compressed_files_read_like_plain(tmp_path):
    text = "\n".join(DOCS) + "\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    write_zst(tmp_path / "a.txt.zst", text.encode())
    records = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(records)
    write_zst(tmp_path / "b.jsonl.zst", records)
    for name in ("a.txt", "a.txt.gz", "a.txt.zst", "b.jsonl.gz", "b.jsonl.zst"):
        assert read(tmp_path / name)[0] == DOCS, name


def test_zst_with_several_frames(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    (tmp_path / "m.txt.zst").write_bytes(c.compress(b"one\ntwo\n") + c.compress(b"three\n"))
    assert read(tmp_path / "m.txt.zst")[0] == ["one", "two", "three"]


def test_corrupt_gzip_is_one_line_error(tmp_path):
    data = gzip.compress(("line\n" * 10000).encode())
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlmforgeError, match=r"cut\.txt\.gz: cannot read past line"):
        read(path)


def test_parquet_by_row_groups_with_nulls_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    values = [f"row {i}" for i in range(2500)]
    values[3], values[10] = None, ""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": values, "n": list(range(2500))}), path, row_group_size=700)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    docs, stats = read(path)
    assert docs == [v for v in values if v]
    assert stats.skipped == {"missing_field": 1, "empty": 1}
    assert stats.files[str(path)]["skipped"]["missing_field"]["first_line"] == 4
    with pytest.raises(SlmforgeError, match="2500 not_text"):
        read(path, text_field="n")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), other)
    with pytest.raises(SlmforgeError, match="2 missing_field"):
        read(other)


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("b2\n")
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b" / "1.jsonl").write_text('{"text": "b1"}\n')
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    assert read(tmp_path)[0] == ["a", "b1", "b2"]
    assert read(tmp_path / "**" / "*.txt")[0] == ["a", "b2"]


def test_empty_corpus_and_missing_path_are_one_line_errors(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n   \n")
    with pytest.raises(SlmforgeError, match=r"e\.txt: no documents in 1 file\(s\) \(skipped: 3 empty\)"):
        read(tmp_path / "e.txt")
    with pytest.raises(SlmforgeError, match="nope: no such file or folder"):
        read(tmp_path / "nope")
    with pytest.raises(SlmforgeError, match="no files match"):
        read(tmp_path / "*.none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmforgeError, match="folder has no files"):
        read(tmp_path / "empty")


def test_source_config_validation():
    with pytest.raises(ConfigError, match="weight: must be > 0"):
        config.from_dict(SourceConfig, {"path": "x", "weight": 0})
    with pytest.raises(ConfigError, match="format: must be one of"):
        config.from_dict(SourceConfig, {"path": "x", "format": "csv"})


def make_mixed_folder(tmp_path: Path) -> Path:
    """One folder with every format and some bad units, for the resume test."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "mixed"
    root.mkdir()
    lines = [f"line {i}" if i % 7 else "" for i in range(60)]
    (root / "1.txt").write_bytes(("\n".join(lines) + "\n").encode() + b"bad \xff\nend\n")
    with gzip.open(root / "2.txt.gz", "wt") as f:
        f.write("\n".join(f"gz {i}" for i in range(40)) + "\n")
    write_zst(root / "3.jsonl.zst",
              "".join(json.dumps({"text": f"zst {i}"} if i % 5 else {"x": 1}) + "\n"
                      for i in range(40)).encode())
    pq.write_table(pa.table({"text": [f"pq {i}" if i % 9 else None for i in range(50)]}),
                   root / "4.parquet", row_group_size=8)
    return root


@pytest.mark.parametrize("text_unit", ["line", "paragraph"])
def test_resume_from_any_cursor_continues_exactly(tmp_path, text_unit):
    root = make_mixed_folder(tmp_path)
    source = SourceConfig(path=str(root), text_unit=text_unit)
    full_stats = ReadStats()
    full = list(SourceReader(source, full_stats))
    for stop in range(0, len(full), 7):
        reader = SourceReader(source)
        docs = []
        for text in reader:
            docs.append(text)
            if len(docs) == stop + 1:
                break
        # What a checkpoint saves: the cursor and the stats, as JSON.
        cursor = json.loads(json.dumps(reader.cursor()))
        stats = ReadStats.from_dict(json.loads(json.dumps(reader.stats.to_dict())))
        rest = list(SourceReader(source, stats, cursor))
        assert docs + rest == full, stop
        assert stats.to_dict() == full_stats.to_dict(), stop


def test_hf_dataset_from_local_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "", "three", None, "five"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    source = SourceConfig(path=f"hf:{tmp_path / 'ds'}")
    stats = ReadStats()
    assert list(iter_documents(source, stats)) == ["one", "three", "five"]
    assert stats.skipped == {"empty": 1, "missing_field": 1}
    reader = SourceReader(source)
    it = iter(reader)
    assert next(it) == "one" and next(it) == "three"
    assert list(SourceReader(source, reader.stats.copy(), reader.cursor())) == ["five"]


def test_hf_missing_package_or_dataset_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(SlmforgeError, match="needs `datasets`"):
        read("hf:some/dataset")


def test_auto_text_unit_tells_wrapped_prose_from_one_sentence_per_line(tmp_path):
    import textwrap

    from slmforge.text.sources import detect_text_unit

    sentence = "The river runs past the old mill and under the bridge near the market"
    paragraphs = [" ".join([sentence] * 4) + "." for _ in range(12)]
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(textwrap.fill(p, 72) for p in paragraphs) + "\n", encoding="utf-8")
    unit, why = detect_text_unit(book)
    assert unit == "paragraph" and why.startswith("wrapped prose")
    # sentence per line, articles separated by blank lines: lines end sentences, so lines stay the unit
    articles = tmp_path / "articles.txt"
    articles.write_text("\n\n".join("\n".join(f"Sentence {i} of article {a}." for i in range(5))
                                    for a in range(10)) + "\n", encoding="utf-8")
    assert detect_text_unit(articles)[0] == "line"
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(f"line {i} of a corpus" for i in range(100)) + "\n", encoding="utf-8")
    assert detect_text_unit(plain)[0] == "line"
    gz = tmp_path / "book.txt.gz"
    gz.write_bytes(gzip.compress(book.read_bytes()))
    assert detect_text_unit(gz, "gz")[0] == "paragraph"
    docs, stats = read(book)  # the reader applies it (auto is the default) and records it
    assert len(docs) == 12 and stats.files[str(book)]["text_unit"] == "paragraph"
    assert read(book, text_unit="line")[0] != docs  # an explicit unit is kept


def test_split_long_keeps_every_character_and_cuts_between_clusters():
    import unicodedata

    from slmforge.text.sampling import split_long

    text = ("क्षत्रिय " * 40 + "অসমীয়া" * 50 + " word" * 30) * 3
    for limit in (16, 37, 100, 1000):
        pieces = list(split_long(text, limit))
        assert "".join(pieces) == text and all(0 < len(p) <= limit for p in pieces)
        for piece, nxt in zip(pieces, pieces[1:]):
            assert unicodedata.category(nxt[0])[0] != "M"  # never starts with a matra or nukta
            assert unicodedata.combining(piece[-1]) != 9  # never ends on a virama
    assert list(split_long("short", 10)) == ["short"] and list(split_long("", 10)) == [""]
    assert list(split_long("aaaa bbbb cccc", 12)) == ["aaaa bbbb", " cccc"]  # cut before the space
