"""Issue 23: personal data written in any script's digits, HTML-wrapped documents, datatrove's raw
statistics in the curation report, and the run report's all-zero charts, sentinel runs, long sample
tables and process counts that changed during a run."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from slmforge import config
from slmforge.errors import ConfigError
from slmforge.report import collect, make_report

HI = "भारत की राजधानी नई दिल्ली है और यह देश के उत्तर में स्थित एक बड़ा शहर है।"
HI2 = "गंगा नदी हिमालय से निकलती है और बंगाल की खाड़ी में जाकर मिलती है, रास्ते में कई शहर बसे हैं।"
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")
BENGALI = str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯")


# ------------------------------------------------------------------------------------------ PII


def test_phone_numbers_in_devanagari_and_bengali_digits_with_a_leading_zero_are_redacted():
    pytest.importorskip("datatrove")
    from slmforge.curate.redact import Redactor

    redactor = Redactor()
    for number in ("০৯৮৭৬৫৪৩২১০", "०९८७६५४३२१०", "০৩৬১ ২৩৪৫৬৭৮", "09876543210", "0361 2345678"):
        assert redactor.redact(number) == ("<PHONE>", {"phone": 1}), number
        sentence = f"फोन {number} पर करें।"
        assert redactor.redact(sentence)[0] == "फोन <PHONE> पर करें।", number
        assert redactor.find(sentence) == [("phone", number)]
    # the same gap in the other kinds: digits of any script count as digits there too
    assert redactor.redact("मेल ramesh१२३@example.com पर")[0] == "मेल <EMAIL> पर"
    assert redactor.redact("सर्वर २०३.०.११३.९ से")[0] == "सर्वर <IP> से"
    assert redactor.redact("আধার ২৩৪৫ ৬৭৮৯ ০১২৩ লিখক")[0] == "আধার <AADHAAR> লিখক"
    # ordinary numbers stay, in every script
    for text in ("सन २०२४ में १५०० लोग आए और टिकट ₹५०० का था।", "পিন কোড ৭৮১০০১, বাড়ি ১২৩৪৫৬৭৮৯০ নম্বর",
                 "कुल १,२५,००० रुपये, कक्षा ०९", "In 2024, 1500 people; 1234567890 is a count.", "০৩৬১"):
        assert redactor.redact(text) == (text, {}), text


def test_any_script_digits_are_redacted_exactly_where_ascii_digits_are():
    pytest.importorskip("datatrove")
    from slmforge.curate.redact import Redactor

    redactor = Redactor()
    rng = random.Random(23)
    pieces = ["0", "+91 ", "0091", "(022) ", "-", " ", "98765", "43210", "2345", "6789", "0123", "011", "1989",
              "203.0.113.9", "12", "7", "x", "ab@", "mail.in", "फोन ", "१०"]
    for _ in range(400):
        ascii_text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        expected = redactor.redact(ascii_text)
        for script in (DEVANAGARI, BENGALI):
            text = ascii_text.translate(script)
            got = redactor.redact(text)
            assert got[1] == expected[1], (ascii_text, text)
            assert got[0] == expected[0].translate(script), (ascii_text, text)


# ------------------------------------------------------------------------------------------ HTML

HTML_DOC = (f'<div class="post"><h2>समाचार</h2><p>{HI}</p><p>{HI2} &amp; <a href="/more">और पढ़ें</a></p>'
            f'<script>var x = "<p>";</script><style>p{{color:red}}</style></div>')


def test_html_is_turned_into_its_text():
    pytest.importorskip("datatrove")
    from slmforge.curate.markup import html_to_text, looks_like_html

    text = html_to_text(HTML_DOC)
    assert text == f"समाचार\n\n{HI}\n\n{HI2} & और पढ़ें"
    page = ("<!DOCTYPE html><html><head><title>site</title><meta charset=utf-8></head><body><ul><li>एक</li>"
            "<li>दो<br>तीन</li></ul><table><tr><td>a</td><td>b</td></tr></table><!-- note --></body></html>")
    assert html_to_text(page) == "एक\nदो\nतीन\n\na b"
    assert looks_like_html(HTML_DOC) and looks_like_html(page) and looks_like_html("<p>x</p>")
    for plain in (HI, "a < b and c > d", "use <b> for bold", "Home | About | Contact"):
        assert not looks_like_html(plain), plain


def test_html_wrapped_documents_are_stripped_and_counted_not_dropped_as_symbols(tmp_path):
    pytest.importorskip("datatrove")
    pytest.importorskip("py3langid")
    from slmforge.curate.config import CurateConfig, HtmlConfig, QualityConfig
    from slmforge.curate.pipeline import curate
    from slmforge.curate.steps import HtmlText, QualityFilter
    from datatrove.data import Document

    # what happened: the quality stage drops the page whole, as symbols
    quality = QualityFilter(QualityConfig())
    assert quality.filter(Document(text=HTML_DOC, id="0", metadata={"language": "hi"})) == (False, "symbols")
    assert CurateConfig().stages[0] == "html"  # on by default, first
    with pytest.raises(ConfigError, match="html.min_tags"):
        config.from_dict(CurateConfig, {"inputs": [{"path": "x"}], "html": {"min_tags": 0}})
    doc = Document(text=HI, id="1", metadata={})
    assert HtmlText(HtmlConfig()).filter(doc) is True and doc.text == HI  # plain text untouched
    assert HtmlText(HtmlConfig(detect="always")).filter(Document(text="<p> </p>", id="2", metadata={})) == \
        (False, "empty_html")

    raw = tmp_path / "raw.jsonl"
    texts = [HTML_DOC, HI, HI, "The capital of India is New Delhi and it is a large city in the north of the country."]
    raw.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    cfg = config.from_dict(CurateConfig, {
        "inputs": [{"path": str(raw)}], "out": str(tmp_path / "out"), "workers": 1,
        "stages": ["html", "normalize", "script", "language", "quality", "exact_dedup"],
        "language": {"candidates": ["hi", "en"]}})
    out = curate(cfg, show_progress=False)
    kept = []
    for f in sorted((out / "data").rglob("*.jsonl.gz")):
        kept += [json.loads(line)["text"] for line in gzip.open(f, "rt", encoding="utf-8")]
    assert html_to_text_of(HTML_DOC) in kept and not any("<" in t for t in kept)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    html_stage = report["stages"][0]
    assert html_stage["name"] == "html" and html_stage["details"] == {"html_stripped": 1}
    assert html_stage["changed_documents"] == 1 and html_stage["removed"]["documents"] == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "HTML documents whose tags were stripped: 1" in page
    # the dedup stage's raw datatrove counters (doc_len, total, forwarded, dropped) are not shown
    for stage in report["stages"]:
        assert not set(stage["details"]) & RAW_DATATROVE, stage["details"]
    assert "doc_len" not in page and "forwarded" not in page


def html_to_text_of(text: str) -> str:
    from slmforge.curate.markup import html_to_text
    from slmforge.curate.steps import Normalize
    from slmforge.curate.config import NormalizeConfig

    return Normalize(NormalizeConfig()).normalize(html_to_text(text))


# ------------------------------------------------------------------------------------------ curation report

RAW_DATATROVE = {"doc_len", "doc_len_tokens", "total", "forwarded", "dropped", "batches", "line-total",
                 "line-kept", "line-filter-no_terminal_punc", "index_match", "total_matches"}


def test_curation_report_shows_named_counters_and_no_raw_datatrove_stats(tmp_path):
    pytest.importorskip("datatrove")
    from slmforge.curate.config import CurateConfig
    from slmforge.curate.report import build_report, render_html

    stats = tmp_path / "logs" / "filter" / "stats"
    stats.mkdir(parents=True)
    doc_len = {"total": 1373, "n": 3, "mean": 457.7, "min": 80, "max": 900, "unit": "doc"}
    steps = [
        {"curate_stage": "c4", "samples": {}, "stats": {
            "in/docs/en": 3, "out/docs/en": 2, "in/bytes/en": 1500, "out/bytes/en": 1373,
            "drop/c4_too_few_sentences/en": 1, "dropbytes/c4_too_few_sentences/en": 127,
            "inner/line-total": 9, "inner/line-kept": 7, "inner/line-filter-no_terminal_punc": 2}},
        {"curate_stage": "pii", "samples": {}, "stats": {
            "in/docs/en": 2, "out/docs/en": 2, "changed/docs/en": 1, "inner/redacted_phone": 2}},
        {"curate_stage": "exact_dedup", "samples": {}, "stats": {
            "in/docs/en": 2, "out/docs/en": 1, "in/bytes/en": 1373, "out/bytes/en": 700,
            "drop/exact_duplicate/en": 1, "dropbytes/exact_duplicate/en": 673, "inner/doc_len": doc_len,
            "inner/total": 2, "inner/forwarded": 1, "inner/dropped": 1}},
    ]
    (stats / "00000.json").write_text(json.dumps(steps))
    cfg = config.from_dict(CurateConfig, {"inputs": [{"path": "x"}], "stages": ["c4", "pii", "exact_dedup"]})
    report = build_report(cfg, [tmp_path / "logs" / "filter"], 0.0)
    details = {s["name"]: s["details"] for s in report["stages"]}
    assert details["exact_dedup"] == {}
    assert details["pii"] == {"redacted_phone": 2}
    assert details["c4"] == {"lines_checked": 9, "lines_kept": 7, "lines_removed_no_terminal_punc": 2}
    page = render_html(report)
    assert "phone numbers redacted: 2" in page and "lines removed: no terminal punc: 2" in page
    for raw in RAW_DATATROVE:
        assert f"{raw}:" not in page and f"{raw}</" not in page, raw
        assert all(raw not in d for d in details.values()), raw
    assert "1,373" not in page.split("exact_dedup")[-1].split("</table>")[-1]  # no "doc_len: 1,373" line


# ------------------------------------------------------------------------------------------ run report


@pytest.fixture
def run(tmp_path):
    """A run folder with a config, a few loss records and one checkpoint; no tokenizer."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[model]\nfamily = "llama"\n[train]\nmax_steps = 600\n'
                                     'seq_len = 32\nbatch_size = 4\n')
    records = [{"step": s, "split": "train", "loss": 5.0 - s / 200} for s in (100, 300, 500, 600)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _checkpoint(run: Path, step: int, processes: int, **extra) -> Path:
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step, "processes": processes, "objective": {"kind": "clm"},
                                                  "hardware": {"device": "cuda:0", "processes": processes},
                                                  **extra}))
    return folder


def _history(run: Path, starts: list[int], **extra) -> None:
    entries = [{"started": f"2025-01-0{i + 1} 10:00:00", "resumed_from_step": s, "config": {"train": {}}, **extra}
               for i, s in enumerate(starts)]
    (run / "config_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_processes_show_what_the_run_used_over_its_history(run):
    # DDP on 2 processes to step 500, resumed on 1: only the newest checkpoint is kept (keep_last = 1),
    # the trainer's kept warning says what the resume changed
    _checkpoint(run, 600, 1)
    _history(run, [0, 500])
    (run / "events.jsonl").write_text(json.dumps({"step": 500, "warning": "resuming 2-process state on 1 processes: "
                                                  "dropout is reseeded; data order and masks continue exactly"}) + "\n")
    summary = collect(run).summary()
    assert summary["processes"] == "2 (steps 0-500), 1 (steps 500-600)"
    assert "processes" not in summary["hardware"]  # said once, in its own row
    # both checkpoints kept: their meta.json say it, no warning needed
    (run / "events.jsonl").unlink()
    _checkpoint(run, 500, 2)
    assert collect(run).summary()["processes"] == "2 (steps 0-500), 1 (steps 500-600)"
    # a run that always ran on 2 shows just 2
    for folder in (run / "checkpoints").iterdir():
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "processes": 2}))
    assert collect(run).summary()["processes"] == "2"
    md = make_report([run], run / "r.html")[1].read_text()
    assert "| processes | 2 |" in md


def test_history_entries_that_record_processes_are_used(run):
    _checkpoint(run, 600, 1)
    entries = [{"started": "2025-01-01 10:00:00", "resumed_from_step": 0, "processes": 4, "config": {}},
               {"started": "2025-01-02 10:00:00", "resumed_from_step": 300, "processes": 2, "config": {}},
               {"started": "2025-01-03 10:00:00", "resumed_from_step": 500, "processes": 1, "config": {}}]
    (run / "config_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert collect(run).summary()["processes"] == "4 (steps 0-300), 2 (steps 300-500), 1 (steps 500-600)"


def test_an_all_zero_exact_match_chart_shows_its_zeros(run, monkeypatch):
    from slmforge.report import figures

    (_checkpoint(run, 600, 1) / "eval.json").write_text(json.dumps({
        "held_out": {"loss": 1.2, "exact_match": 0.0}, "hi": {"loss": 1.5, "exact_match": 0.0}}))
    drawn = []
    real_png = figures._png
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or real_png(fig))
    bars = figures._eval_bars([collect(run)])
    assert [f.title for f in bars] == ["evaluation: exact match (all 0)"]
    ax = drawn[-1].axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("0") == 2 and any("is 0" in t for t in texts)  # a value label per bar and a note
    assert ax.get_ylim()[1] > 0.5 and ax.lines  # a visible scale with the zero marks drawn on it
    md = make_report([run], run / "zero.html")[1].read_text()
    assert "![evaluation: exact match (all 0)](zero-eval-exact_match.png)" in md


def test_sentinel_runs_are_collapsed_and_long_sample_lists_are_capped(run):
    sentinels = "".join(f"<extra_id_{i}>" for i in range(100))
    rows = [{"prompt": f"question {i}", "reference": "answer", "output": sentinels if i == 0 else f"answer {i}",
             "exact": i > 0} for i in range(95)]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html_path, md_path = make_report([run], run / "s.html")
    md, page = md_path.read_text(), html_path.read_text()
    assert "<extra_id_0>…<extra_id_99> (100 sentinels)" in md and "<extra_id_50>" not in md
    assert "&lt;extra_id_0&gt;…&lt;extra_id_99&gt; (100 sentinels)" in page and "extra_id_50" not in page
    table = md.split("| prompt | output | reference | exact |")[1].split("\n\n")[0]
    assert table.count("| question ") == 10 and "| question 10 |" not in table
    assert "… 85 more in samples.jsonl (10 of 95 shown)." in md
    # samples.txt lines (the quickstart's), and short special-token runs stay as written
    (run / "samples.jsonl").unlink()
    lines = [f"[hi] sample {i} <s> x </s> <pad><pad>" for i in range(30)]
    (run / "samples.txt").write_text("\n".join(lines) + "\n")
    md = make_report([run], run / "t.html")[1].read_text()
    assert lines[9] in md and lines[10] not in md and "… 20 more in samples.txt (10 of 30 shown)." in md
