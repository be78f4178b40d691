"""`slmforge data curate`: each stage on hand-made positive and negative examples in Hindi, Assamese,
Bengali, English and German; dedup, redaction, resume, bad input, the report, and the output feeding
`tokenizer train` and `data prepare`."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import Page, needs_chromium

pytest.importorskip("datatrove")
pytest.importorskip("py3langid")

from datatrove.data import Document  # noqa: E402

from slmforge import config  # noqa: E402
from slmforge.curate import quality, scripts  # noqa: E402
from slmforge.curate.config import (  # noqa: E402
    BlocklistConfig,
    CurateConfig,
    LanguageConfig,
    NormalizeConfig,
    PiiConfig,
    QualityConfig,
    ScriptConfig,
    load_config,
)
from slmforge.curate.pipeline import curate  # noqa: E402
from slmforge.curate.redact import Redactor, compile_terms  # noqa: E402
from slmforge.curate.steps import (  # noqa: E402
    BlocklistFilter,
    LanguageModel,
    LanguageTagger,
    Normalize,
    PiiRedactor,
    QualityFilter,
    ScriptTagger,
)
from slmforge.errors import ConfigError, SlmforgeError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# One clean sentence per language; the Assamese one has ৰ/ৱ, the Bengali one র.
CLEAN = {
    "hi": "भारत की राजधानी नई दिल्ली है और यह देश के उत्तर में स्थित एक बड़ा शहर है।",
    "as": "অসমৰ ৰাজধানী দিছপুৰ আৰু এই ঠাইখন গুৱাহাটী চহৰৰ ভিতৰত অৱস্থিত হয়।",
    "bn": "বাংলাদেশের রাজধানী ঢাকা এবং এটি দেশের সবচেয়ে বড় শহর যেখানে অনেক মানুষ থাকে।",
    "en": "The capital of India is New Delhi and it is a large city in the north of the country.",
    "de": "Die Hauptstadt von Deutschland ist Berlin und sie ist die größte Stadt des Landes.",
}


def doc(text: str, lang: str = "und", **metadata) -> Document:
    return Document(text=text, id="t", metadata={"language": lang, **metadata})


def run_filter(step, text: str, lang: str = "und", **metadata):
    d = doc(text, lang, **metadata)
    result = step.filter(d)
    keep, reason = (result, None) if isinstance(result, bool) else result
    return keep, reason, d


def curate_cfg(tmp_path: Path, inputs: list[dict], **fields) -> CurateConfig:
    return config.from_dict(CurateConfig, {"inputs": inputs, "out": str(tmp_path / "out"), "workers": 1, **fields})


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def output_texts(out: Path) -> list[str]:
    texts = []
    for f in sorted((out / "data").rglob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    return texts


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): gzip.decompress(f.read_bytes()) for f in sorted((out / "data").rglob("*.gz"))}


# ---------------------------------------------------------------- normalize


def test_normalize_repairs_and_keeps_clean_text_in_every_language():
    step = Normalize(NormalizeConfig())
    for lang, text in CLEAN.items():  # negative: clean text is left exactly as it is
        assert run_filter(step, text, lang)[2].text == text, lang
    cases = {
        "à¤­à¤¾à¤°à¤¤ à¤•à¥€": "भारत की",                       # Hindi UTF-8 read as cp1252 (mojibake)
        "ক\u09c7\u09beন": "কোন",                                     # Bengali/Assamese o-sign composed (NFC)
        "Gro\u0308\u00dfe\u00a0 Stadt\t\tam   Rhein\x07": "Größe Stadt am Rhein",  # German: NFC, spaces, control
        "\ufeffThe  end.\r\n\r\n\r\n\r\nNext\u200b line": "The end.\n\nNext line",
    }
    for raw, want in cases.items():
        assert run_filter(step, raw)[2].text == want
    assert run_filter(step, "क्\u200dष  अ\u200cक")[2].text == "क्\u200dष अ\u200cक"  # ZWJ/ZWNJ stay
    assert run_filter(step, " \u200b\t\n ")[:2] == (False, "empty")


# ---------------------------------------------------------------- scripts and languages


def test_script_shares_tell_assamese_from_bengali_and_flag_romanized_hindi():
    step = ScriptTagger(ScriptConfig())
    expect = {"hi": ("Deva", None), "as": ("Beng", "as"), "bn": ("Beng", "bn"), "en": ("Latn", None),
              "de": ("Latn", None)}
    for lang, text in CLEAN.items():
        keep, _, d = run_filter(step, text)
        assert keep and (d.metadata["script"], d.metadata.get("bengali_script_language")) == expect[lang], lang
        assert d.metadata["script_shares"][d.metadata["script"]] == 1.0
        assert d.metadata["romanized_hindi"] is False, lang  # negatives: no Latin Hindi here
    mixed = scripts.script_shares("दिल्ली Delhi")
    assert set(mixed) == {"Deva", "Latn"} and abs(mixed["Deva"] - 6 / 11) < 1e-9
    assert scripts.is_romanized_hindi("yeh kya hai bhai, mujhe nahi pata ki woh kab aayega")
    for text in (CLEAN["en"], CLEAN["de"], "Main road to the station, he said, is closed."):
        assert not scripts.is_romanized_hindi(text), text


def test_script_filter_keeps_listed_scripts_and_drops_mixed_or_romanized():
    keep_deva = ScriptTagger(ScriptConfig(keep=["Deva"]))
    assert run_filter(keep_deva, CLEAN["hi"])[0]
    assert run_filter(keep_deva, CLEAN["bn"])[:2] == (False, "script_Beng")
    mixed = ScriptTagger(ScriptConfig(min_share=0.8))
    assert run_filter(mixed, "भारत India की Delhi राजधानी capital")[:2] == (False, "mixed_scripts")
    assert run_filter(mixed, CLEAN["as"])[0]
    roman = ScriptTagger(ScriptConfig(drop_romanized_hindi=True))
    assert run_filter(roman, "yeh kya hai bhai mujhe nahi pata")[:2] == (False, "romanized_hindi")
    assert run_filter(roman, CLEAN["en"])[0]


def test_language_id_with_the_bundled_model_and_assamese_letters():
    tag = ScriptTagger(ScriptConfig())
    lang_id = LanguageTagger(LanguageConfig(keep=["hi", "as"]))
    for lang, text in CLEAN.items():
        d = doc(text)
        tag.filter(d)
        result = lang_id.filter(d)
        assert d.metadata["language"] == lang, (lang, d.metadata)
        assert (result is True) == (lang in ("hi", "as")), lang
        if lang not in ("hi", "as"):
            assert result == (False, f"language_{lang}")
    # A short Assamese text the model alone may call Bengali follows its letters ৰ/ৱ.
    d = doc("মোৰ নাম ৰাম")
    tag.filter(d)
    lang_id.filter(d)
    assert d.metadata["language"] == "as"
    d = doc("yeh kya hai bhai mujhe nahi pata")
    tag.filter(d)
    assert lang_id.filter(d) == (False, "language_hi-Latn")


def test_missing_language_model_is_one_clear_line(tmp_path):
    with pytest.raises(SlmforgeError, match=r"fastText model .*lid\.176\.bin not found.*py3langid"):
        LanguageModel(LanguageConfig(model=f"fasttext:{tmp_path}/lid.176.bin")).check()
    with pytest.raises(ConfigError, match="curate.language.model"):
        config.from_dict(CurateConfig, {"inputs": [{"path": "x"}], "language": {"model": "cld3"}}, "curate")


# ---------------------------------------------------------------- quality


def test_quality_keeps_clean_text_and_drops_each_kind_of_noise_per_language():
    step = QualityFilter(QualityConfig())
    for lang, text in CLEAN.items():
        assert run_filter(step, text, lang)[0], lang
    noise = {
        "hi": {"no_stop_words": "होम समाचार खेल मनोरंजन व्यापार संपर्क",
               "repeated_lines": "यह एक पंक्ति है\nयह एक पंक्ति है\nयह एक पंक्ति है\nऔर यह दूसरी है",
               "digits": "फोन 98 76 54 32 10 22 33 44 है और 55 66 77 88 99",
               "too_few_words": "नमस्ते"},
        "as": {"no_stop_words": "ঘৰ বাতৰি খেল বিনোদন ব্যৱসায় যোগাযোগ",
               "repeated_5grams": f"{CLEAN['as']} ব্ৰহ্মপুত্ৰ নৈৰ পাৰত এখন সুন্দৰ চহৰ আৰু মানুহবোৰ বহুত ভাল। "
                                  "ব্ৰহ্মপুত্ৰ নৈৰ পাৰত এখন সুন্দৰ চহৰ যিটো সকলোৱে জানে।",
               "symbols": "আৰু এই কথাটো ভাল ### *** ||| ~~~ @@@ {{{ }}} হয়"},
        "bn": {"no_stop_words": "হোম খবর খেলা বিনোদন ব্যবসা যোগাযোগ",
               "repeated_2gram": "শুভ সকাল " * 10 + "এবং আপনার দিন ভালো কাটুক",
               "too_few_words": "ঢাকা"},
        "en": {"no_stop_words": "Home News Sports Entertainment Business Contact Login",
               "short_words": "a b c d e f g h i j k l m n o p the",
               "symbols": "The ★★★★★ ✓✓✓ ♥♥♥ →→→ deals of the day ★★★★★"},
        "de": {"no_stop_words": "Startseite Nachrichten Sport Unterhaltung Wirtschaft Kontakt",
               "long_words": "Die Donaudampfschifffahrtsgesellschaftskapitänswitwenrentenversicherung "
                             "Rechtsschutzversicherungsgesellschaftenvertragsbedingungen",
               "repeated_lines": "Jetzt kaufen und sparen\nJetzt kaufen und sparen\nJetzt kaufen und sparen"},
    }
    for lang, cases in noise.items():
        for reason, text in cases.items():
            assert run_filter(step, text, lang)[:2] == (False, reason), (lang, reason)
    # a per-language override from the config, and a language without stop words skips that rule
    relaxed = QualityFilter(config.from_dict(QualityConfig, {"languages": {"hi": {"min_words": 1}}}))
    assert run_filter(relaxed, "नमस्ते और", "hi")[0]
    assert quality.check("Merhaba dünya nasılsın bugün", "tr", quality.thresholds_for("tr")) is None
    # a short sentence that says "the river" twice is not repetitive text
    assert quality.check("The river is long and the water of the river is cold.", "en", quality.thresholds_for("en")) is None


def test_datatrove_filters_run_on_their_languages_only(tmp_path):
    from datatrove.pipeline.filters import GopherQualityFilter

    from slmforge.curate.pipeline import stage_step

    cfg = curate_cfg(tmp_path, [{"path": "x"}], keep_removed=False)
    step = stage_step(cfg, "gopher_quality", tmp_path)
    assert isinstance(step.inner, GopherQualityFilter)
    long_en = " ".join([CLEAN["en"]] * 5)
    docs = [doc(CLEAN["en"], "en"), doc(long_en, "en"), doc(CLEAN["hi"], "hi")]
    kept = [d.text for d in step.run(iter(docs))]
    assert kept == [long_en, CLEAN["hi"]]  # short English dropped; Hindi not judged by English rules
    assert step.stats["drop/gopher_short_doc/en"].total == 1


# ---------------------------------------------------------------- redaction and block lists

PII_TEXTS = [
    "मेरा ईमेल ramesh.kumar@example.co.in है और फोन +91 98765 43210 पर करें।",
    "আমাৰ নম্বৰ ০৯৮৭৬৫-৪৩২১০ নহয়, 9876543210 আৰু আধাৰ 2345 6789 0123 লিখক।",
    "আমার প্যান ABCPE1234F এবং সার্ভার 203.0.113.9 থেকে মেল info@dhaka.org.bd পাঠান।",
    "Call the office on 011-23456789 or (022) 2345 6789, or +1 (415) 555-0100.",
    "Schreiben Sie an anna.mueller@beispiel.de oder rufen Sie +49 30 1234567 an, IP 192.168.0.1.",
    "फोन ९८७६५४३२१० और आधार २३४५-६७८९-०१२३ पर।",
]
NOT_PII = [
    "सन 2024 में 1500 लोग आए और टिकट ₹500 का था।",
    "In 1989 the wall fell; page 12-15 of volume 3.2 covers it.",
    "Die Jahre 1933 bis 1945 und die Nummer 42 sind bekannt.",
]


def test_redaction_leaves_no_personal_data_and_keeps_the_rest():
    redactor = Redactor()
    for text in PII_TEXTS:
        assert redactor.find(text), text  # the detector sees something to redact
        clean, counts = redactor.redact(text)
        assert redactor.find(clean) == [], (text, clean)
        assert sum(counts.values()) == clean.count("<"), clean
        # everything but the redacted spans is unchanged
        pieces = re.split(r"<(?:EMAIL|PHONE|IP|AADHAAR|PAN)>", clean)
        position = 0
        for piece in pieces:
            found = text.find(piece, position)
            assert found >= position, (piece, text)
            position = found + len(piece)
    for text in NOT_PII + list(CLEAN.values()):
        assert redactor.redact(text)[0] == text
    step = PiiRedactor(PiiConfig(kinds=["email"], placeholders={"email": "[mail]"}))
    assert run_filter(step, PII_TEXTS[0])[2].text.startswith("मेरा ईमेल [mail] है और फोन +91 98765 43210")


def test_blocklist_matches_whole_words_inside_indic_scripts(tmp_path):
    # Python's \b gets Indic words wrong both ways: a vowel sign (ी) is not \w.
    assert re.findall(r"\bकम\b", "कमी") == ["कम"] and re.findall(r"\bगंदी\b", "यह गंदी बात") == []
    lists = tmp_path / "hi.txt"
    lists.write_text("# Hindi\nगंदी\nकम\n", encoding="utf-8")
    step = BlocklistFilter(BlocklistConfig(files={"hi": str(lists)}, words={
        "as": ["বেয়া"], "bn": ["খারাপ"], "en": ["darn"], "de": ["Mist"], "*": ["spamword"]}))
    positives = {"hi": "यह गंदी बात है", "as": "এইটো বেয়া কথা", "bn": "এটা খারাপ কথা", "en": "Oh DARN it.",
                 "de": "So ein Mist!"}
    negatives = {"hi": "उसमें कमी है", "as": "বেয়াকৈ নহয়", "bn": "খারাপভাবে নয়", "en": "Darning socks.",
                 "de": "Die Mistel blüht."}
    for lang in positives:
        assert run_filter(step, positives[lang], lang)[:2] == (False, "blocklist"), lang
        assert run_filter(step, negatives[lang], lang)[0], lang
        assert run_filter(step, CLEAN[lang], lang)[0], lang
    assert run_filter(step, "buy spamword now", "de")[:2] == (False, "blocklist")  # "*" list
    masked = BlocklistFilter(BlocklistConfig(words={"hi": ["गंदी"]}, action="mask"))
    assert run_filter(masked, "गंदी और गंदीपन", "hi")[2].text == "<BLOCKED> और गंदीपन"
    assert compile_terms([]) is None


# ---------------------------------------------------------------- end to end


def _corpus(tmp_path: Path) -> list[dict]:
    """Three input files in three formats, with noise, PII and duplicates in every language."""
    rng = random.Random(0)
    lines = []
    for i in range(12):
        for lang, text in CLEAN.items():
            lines.append(f"{text} ({i}) " + rng.choice(["", "", PII_TEXTS[i % len(PII_TEXTS)]]))
    lines += ["Home | About | Contact | Login", CLEAN["hi"], CLEAN["hi"], "  " + CLEAN["de"] + "  "]
    write_jsonl(tmp_path / "a.jsonl", lines[:30])
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[30:50]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": lines[50:]}), tmp_path / "c.parquet")
    return [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.txt.gz")},
            {"path": str(tmp_path / "c.parquet"), "text_field": "content"}]


def test_curate_end_to_end_report_and_self_contained_html(tmp_path):
    # candidates: without them py3langid may call a Hindi line with an email in it Nepali or Marathi
    cfg = curate_cfg(tmp_path, _corpus(tmp_path), language={"candidates": list(CLEAN)})
    out = curate(cfg, show_progress=False)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    texts = output_texts(out)
    assert report["output"]["documents"] == len(texts) > 0
    assert report["input"]["documents"] == 64 and report["input"]["files"] == 3
    assert {p.name for p in (out / "data").iterdir()} == set(CLEAN)  # one folder per language
    redactor = Redactor()
    assert all(redactor.find(t) == [] for t in texts)
    assert len(texts) == len(set(texts))
    stages = report["stages"]
    assert [s["name"] for s in stages] == CurateConfig().stages
    for s, nxt in zip(stages, stages[1:]):
        assert s["out"] == nxt["in"], s["name"]
    for s in stages:
        assert s["in"]["documents"] == s["out"]["documents"] + s["removed"]["documents"], s["name"]
        for lang, v in s["by_language"].items():
            assert v["in_documents"] == v["out_documents"] + v["removed_documents"], (s["name"], lang)
    by_name = {s["name"]: s for s in stages}
    assert by_name["quality"]["reasons"][0]["reason"] == "no_stop_words"
    assert by_name["quality"]["reasons"][0]["samples"][0]["text"] == "Home | About | Contact | Login"
    assert by_name["exact_dedup"]["removed"]["documents"] >= 1
    assert by_name["pii"]["details"]["redacted_email"] >= 1
    removed = [json.loads(line) for f in (out / "removed").rglob("*.gz")
               for line in gzip.open(f, "rt", encoding="utf-8")]
    assert len(removed) == sum(s["removed"]["documents"] for s in stages)
    assert all(r["metadata"]["curate_reason"] for r in removed)
    assert json.loads((out / "curate.json").read_text())["documents"] == len(texts)

    # The HTML page stands alone: no script, stylesheet link, image or any src/href leaving the page.
    class Check(HTMLParser):
        tags, external, bars = set(), [], 0

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            for name, value in attrs:
                if name in ("src", "href", "srcset", "data") or (value and "url(" in value):
                    self.external.append((tag, name, value))
                if name == "class" and value and "bar" in value.split():
                    self.bars += 1

    page = (out / "report.html").read_text(encoding="utf-8")
    check = Check()
    check.feed(page)
    assert check.external == [] and not {"script", "link", "img", "iframe"} & check.tags
    assert check.bars >= len(stages) and "http" not in page.split("</style>")[0]
    assert "no_stop_words" in page and "Home | About | Contact | Login" in page

    # the same command again does nothing; other settings into the same folder are refused
    assert curate(cfg, show_progress=False) == out
    with pytest.raises(SlmforgeError, match="other settings"):
        curate(curate_cfg(tmp_path, _corpus(tmp_path), stages=["normalize"]), show_progress=False)


def test_exact_dedup_is_order_independent(tmp_path):
    base = [CLEAN["hi"], CLEAN["hi"].replace(" ", "  "), CLEAN["en"], CLEAN["en"].upper(), CLEAN["de"],
            CLEAN["as"], CLEAN["as"], CLEAN["bn"], CLEAN["de"] + " Ende."]
    results = []
    for seed in range(3):
        texts = base[:]
        random.Random(seed).shuffle(texts)
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        write_jsonl(folder / "in.jsonl", texts)
        cfg = config.from_dict(CurateConfig, {"inputs": [{"path": str(folder / "in.jsonl")}],
                                              "out": str(folder / "out"), "workers": 1,
                                              "stages": ["exact_dedup"]})
        results.append(sorted(output_texts(curate(cfg, show_progress=False))))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 6  # hi, en, de, as, bn, de + "Ende."


def test_near_dedup_removes_light_edits_and_keeps_distinct_documents(tmp_path):
    rng = random.Random(1)
    vocab = {lang: scripts.words(text) for lang, text in CLEAN.items()}

    def article(lang: str, n: int = 120) -> str:
        return " ".join(rng.choice(vocab[lang]) + str(rng.randint(0, 99)) for _ in range(n))

    originals = {lang: article(lang) for lang in CLEAN}
    texts = list(originals.values())
    for lang, text in originals.items():
        words = text.split()
        words[60] = "बदला" if lang == "hi" else "edited"  # a one-word edit
        texts.append(" ".join(words))
        texts.append(text + " .")                     # trailing punctuation
    texts += [article(lang) for lang in CLEAN]        # distinct documents in the same languages
    write_jsonl(tmp_path / "in.jsonl", texts)
    cfg = curate_cfg(tmp_path, [{"path": str(tmp_path / "in.jsonl")}], stages=["near_dedup"])
    kept = output_texts(curate(cfg, show_progress=False))
    assert len(kept) == 10  # one per cluster of three, plus the five distinct documents
    assert all(t in kept for t in texts[-5:])


def test_interrupted_run_resumes_to_identical_output(tmp_path, monkeypatch):
    inputs = _corpus(tmp_path)
    reference = curate(config.from_dict(CurateConfig, {"inputs": inputs, "out": str(tmp_path / "ref"),
                                                       "workers": 1}), show_progress=False)
    calls = {"n": 0}
    original = QualityFilter.filter

    def crash(self, document):
        calls["n"] += 1
        if calls["n"] == 40:  # in the second of three tasks
            raise KeyboardInterrupt
        return original(self, document)

    cfg = curate_cfg(tmp_path, inputs)
    monkeypatch.setattr(QualityFilter, "filter", crash)
    with pytest.raises(KeyboardInterrupt):
        curate(cfg, show_progress=False)
    out = Path(cfg.out)
    # nothing that looks finished: no corpus folder, no report, no manifest
    assert not (out / "data").exists() and not (out / "curate.json").exists() and not (out / "report.json").exists()
    assert (out / ".work" / "logs" / "filter" / "completions" / "00000").exists()
    monkeypatch.setattr(QualityFilter, "filter", original)
    curate(cfg, show_progress=False)
    assert output_bytes(out) == output_bytes(reference)
    ref_report = json.loads((reference / "report.json").read_text())
    new_report = json.loads((out / "report.json").read_text())
    assert ref_report["stages"] == new_report["stages"]


@pytest.mark.slow
def test_two_workers_write_what_one_worker_writes(tmp_path):
    inputs = _corpus(tmp_path)
    outs = [curate(config.from_dict(CurateConfig, {"inputs": inputs, "out": str(tmp_path / f"w{n}"), "workers": n}),
                   show_progress=False) for n in (1, 2)]
    assert output_bytes(outs[0]) == output_bytes(outs[1])
    reports = [json.loads((out / "report.json").read_text()) for out in outs]
    assert reports[0]["stages"] == reports[1]["stages"]


def test_bad_input_files_are_named_and_skipped_or_fail(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [CLEAN["en"], CLEAN["hi"]])
    (tmp_path / "latin1.txt").write_bytes("Größe und Maß\n".encode("latin-1"))
    truncated = gzip.compress((CLEAN["de"] + "\n").encode() * 200)[:-30]
    (tmp_path / "cut.jsonl.gz").write_bytes(truncated)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    inputs = [{"path": str(p)} for p in (good, tmp_path / "latin1.txt", tmp_path / "cut.jsonl.gz",
                                          tmp_path / "broken.parquet")]
    out = curate(curate_cfg(tmp_path, inputs, stages=["normalize"]), show_progress=False)
    report = json.loads((out / "report.json").read_text())
    bad = {Path(b["file"]).name: b["error"] for b in report["input"]["bad_files"]}
    assert report["input"]["bad_file_count"] == 3 and set(bad) == {"latin1.txt", "cut.jsonl.gz", "broken.parquet"}
    assert "not UTF-8 (line 1)" in bad["latin1.txt"]
    assert sorted(output_texts(out)) == sorted([CLEAN["en"], CLEAN["hi"]])  # no document of a bad file
    for name in ("latin1.txt", "cut.jsonl.gz", "broken.parquet"):
        folder = tmp_path / f"fail-{name}"
        cfg = config.from_dict(CurateConfig, {"inputs": [{"path": str(good)}, {"path": str(tmp_path / name)}],
                                              "out": str(folder), "workers": 1, "on_bad_file": "fail",
                                              "stages": ["normalize"]})
        with pytest.raises(SlmforgeError, match=re.escape(name)):
            curate(cfg, show_progress=False)
        assert not (folder / "data").exists() and not (folder / "curate.json").exists()


def test_output_feeds_tokenizer_train_and_data_prepare(tmp_path):
    from slmforge.data.prepare import load_config as load_data_config
    from slmforge.data.prepare import prepare_data
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer

    lines = [f"{text} {i}" for i in range(40) for text in CLEAN.values()]
    write_jsonl(tmp_path / "raw.jsonl", lines)
    out = curate(curate_cfg(tmp_path, [{"path": str(tmp_path / "raw.jsonl")}],
                            stages=["normalize", "script", "language", "quality"],
                            quality={"languages": {"hi": {"min_words": 2}}}), show_progress=False)
    tok = train_tokenizer(config.from_dict(TokenizerConfig, {"vocab_size": 300, "inputs": [str(out / "data")]}),
                          tmp_path / "tok")
    data = prepare_data(load_data_config(flags={
        "sources": [{"path": str(out / "data" / lang), "lang": lang} for lang in ("hi", "as", "en")],
        "tokenizer": str(tok), "out": str(tmp_path / "shards"), "workers": 1, "val_fraction": 0.1}),
        show_progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    assert sum(s["drawn"]["documents"] for s in manifest["sources"]) == 120


# ---------------------------------------------------------------- config, CLI, recipes, README


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^curate\.stages\[1\]: unknown stage 'qualty'"):
        load_config(None, ["curate.stages=['normalize','qualty']"], {"inputs": [{"path": "x"}]})
    with pytest.raises(ConfigError, match="must come last"):
        config.from_dict(CurateConfig, {"inputs": [{"path": "x"}], "stages": ["exact_dedup", "quality"]})
    with pytest.raises(ConfigError, match="slurm.partition"):
        config.from_dict(CurateConfig, {"inputs": [{"path": "x"}], "executor": "slurm"})


def test_slurm_executor_is_datatroves(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from slmforge.curate.pipeline import Job, _executor

    cfg = curate_cfg(tmp_path, [{"path": "x"}], executor="slurm",
                     slurm={"partition": "cpu", "sbatch_args": {"account": "proj42"}})
    first = _executor(cfg, Job("filter", [], 8), tmp_path)
    second = _executor(cfg, Job("exact-find", [], 1), tmp_path, depends=first)
    assert isinstance(second, SlurmPipelineExecutor) and second.depends is first
    assert (first.tasks, first.partition, first.get_sbatch_args()["account"]) == (8, "cpu", "proj42")


def test_cli_curate_and_missing_extra(tmp_path, monkeypatch, capsys):
    from slmforge.cli import main

    write_jsonl(tmp_path / "in.jsonl", [CLEAN["de"], CLEAN["de"], CLEAN["en"]])
    code = main(["data", "curate", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"),
                 "curate.workers=1", "curate.stages=['normalize','exact_dedup']"])
    assert code == 0 and len(output_texts(tmp_path / "out")) == 2
    monkeypatch.setitem(sys.modules, "datatrove", None)  # as if the extra were not installed
    code = main(["data", "curate", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "slmforge: error: data curate needs datatrove: pip install 'slmforge[curate]'"


def test_core_package_imports_without_datatrove():
    probe = ("import sys; sys.modules['datatrove'] = None\n"
             "import slmforge.cli, slmforge.curate, slmforge.data.commands\n"
             "slmforge.cli.build_parser()\n"
             "assert not any(m.startswith(('datatrove', 'ftfy', 'py3langid')) for m in sys.modules if sys.modules[m])\n")
    subprocess.run([sys.executable, "-c", probe], check=True)


@pytest.mark.parametrize("recipe", ["llama-150m-de-en.toml", "gemma3-270m-hindi.toml"])
def test_seed_recipes_have_a_curate_section_that_feeds_their_data(recipe):
    path = ROOT / "recipes" / recipe
    cfg = load_config(path)
    tree = config.read_toml(path)
    assert cfg.inputs and "quality" in cfg.stages and "near_dedup" in cfg.stages
    curated = Path(cfg.out) / "data"
    for source in tree["data"]["sources"]:
        assert Path(source["path"]).parent == curated  # data prepare reads what curate wrote
    assert all(Path(p).parent == curated for p in tree["tokenizer"]["inputs"])


def test_readme_curate_examples_validate():
    page = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")  # where the README's data section went
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", page, re.S) if "[curate" in b]
    assert blocks
    for block in blocks:
        tree = config.tomllib.loads(block)
        config.from_dict(CurateConfig, tree["curate"], "curate")


@needs_chromium
def test_the_curate_report_opens_in_a_real_browser_without_errors(tmp_path):
    """The HTML report of a real run, in headless Chromium: no console error, no request leaving the
    page, and the bar charts drawn (not a blank page)."""
    out = curate(curate_cfg(tmp_path, _corpus(tmp_path), language={"candidates": list(CLEAN)}), show_progress=False)
    page = Page(tmp_path / "chromium-profile")
    try:
        page.open((out / "report.html").as_uri())
        assert page.problems() == []
        assert page.evaluate("document.querySelectorAll('.bar').length") >= 5
        shot = page.screenshot()
        assert shot.std() > 0.05 and (shot.mean(axis=-1) < 0.9).mean() > 0.01
    finally:
        page.close()
