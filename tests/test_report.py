"""`slmforge report`: two real tiny runs (a causal-LM decoder and a masked-LM encoder, one of them
resumed) side by side, opened in headless Chromium: no console errors, no request leaves the page,
every figure decodes, and the screenshot shows both runs' curves. A run with few metrics renders with
what it has and nothing empty."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from browser import Page, needs_chromium
from conftest import MarkovSource, markov_run_data
from slmforge import config
from slmforge.cli import main
from slmforge.report import collect, make_report
from slmforge.report.figures import RUN_COLORS
from slmforge.train.config import PretrainConfig
from slmforge.train.pretrain import pretrain

WORDS = [f"s{i}" for i in range(16)]


def words(source: MarkovSource, length: int, seed: int) -> str:
    return " ".join(WORDS[i] for i in source.sample(length, seed=seed))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A llama-style decoder (clm; stopped at step 10, then resumed to 20) and a BERT encoder (mlm),
    each evaluated per "language" by `slmforge eval --text`, the decoder with sample generations."""
    tmp = tmp_path_factory.mktemp("report")
    source = MarkovSource(vocab=16, seed=0)
    data = markov_run_data(tmp, source, WORDS)
    texts = {}
    for lang, seed in (("hi", 3), ("as", 4)):
        texts[lang] = tmp / f"{lang}.txt"
        texts[lang].write_text("\n".join(words(source, 40, seed * 100 + i) for i in range(6)) + "\n")

    def train(out, *extra):
        pretrain(config.load(PretrainConfig, overrides=[
            f"train.data={data}", "train.seq_len=32", "train.batch_size=4", "schedule.warmup_steps=2",
            f"train.out_dir={out}", "train.log_every=2", "train.eval_every=5", "train.eval_batches=2",
            "optim.lr=3e-3", *extra]))

    decoder, encoder = tmp / "decoder", tmp / "encoder"
    train(decoder, "model.preset=test-tiny", "train.max_steps=10")
    train(decoder, "model.preset=test-tiny", "train.max_steps=20")  # a resume, with a changed max_steps
    train(encoder, "model.preset=bert-tiny", "model.hidden_size=32", "model.num_layers=1",
          "model.intermediate_size=64", "model.num_heads=2", "train.max_steps=20")
    for run in (decoder, encoder):
        assert main(["eval", str(run), "--text", f"hi={texts['hi']}", "--text", f"as={texts['as']}"]) == 0
    from slmforge.checkpoint.reading import open_run
    from slmforge.inference.generate import SamplingConfig, generate_text

    opened = open_run(decoder)
    sample = generate_text(opened.model, opened.tokenizer(), "s1 s2", SamplingConfig(max_new_tokens=8, seed=0))
    (decoder / "samples.txt").write_text(f"[hi] s1 s2 {sample}\n", encoding="utf-8")
    return decoder, encoder, texts


@pytest.fixture
def sparse_run(tmp_path):
    """A run folder as an older or crashed run leaves it: a config, a few loss records (one of them a
    skipped step), a kept warning; no checkpoint, no validation, no eval, no tokenizer."""
    run = tmp_path / "sparse"
    run.mkdir()
    (run / "config.toml").write_text('[model]\nfamily = "llama"\n[train]\nmax_steps = 100\n')
    records = [{"step": 1, "split": "train", "loss": 5.0}, {"step": 2, "split": "train", "loss": 4.5},
               {"step": 3, "split": "train", "skipped": "non-finite loss", "loss": None},
               {"step": 4, "split": "train", "loss": 4.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "spl')
    (run / "events.jsonl").write_text(json.dumps({"step": 4, "warning": "tracker 'wandb' failed at step 4"}) + "\n")
    return run


# ------------------------------------------------------------------------------------------ content


def test_collect_reads_what_each_run_recorded(two_runs):
    decoder, encoder, _ = two_runs
    dec, enc = collect(decoder), collect(encoder)
    assert dec.summary()["objective"] == "clm" and enc.summary()["objective"] == "mlm"
    assert dec.summary()["steps"] == "20 / 20" and dec.summary()["tokens seen"] == f"{20 * 4 * 32:,}"
    from slmforge.checkpoint.reading import open_run

    assert dec.parameters == sum(p.numel() for p in open_run(decoder).model.parameters())
    assert set(dec.evals) == {"hi", "as"} and "bpb" in dec.evals["hi"]
    assert "accuracy" in enc.evals["hi"] and "bpb" not in enc.evals["hi"]
    assert dec.has("lr") and dec.has("grad_norm") and dec.has("tokens_per_s") and dec.has("bpb", "val")
    warnings = dec.warnings()
    assert len(warnings) == 1 and "resumed from step 10" in warnings[0] and "train.max_steps 10 -> 20" in warnings[0]
    assert enc.warnings() == []


def test_markdown_and_html_show_the_same_tables(two_runs, tmp_path):
    decoder, encoder, _ = two_runs
    html_path, md_path = make_report([decoder, encoder], tmp_path / "compare.html")
    md, html = md_path.read_text(), html_path.read_text()
    for section in ("## Runs", "## Config", "## Curves", "## Evaluation", "## Data and tokenizer",
                    "## Sample generations", "## Warnings"):
        assert section in md and f"<h2>{section[3:]}</h2>" in html, section
    # The config diff names what differs (the model family, the objective), not what is the same.
    assert "| model.family | llama | bert |" in md and "| objective.kind | clm | mlm |" in md
    assert "| train.seq_len |" not in md
    # Head to head: a masked-LM loss is no target for a causal LM, so nothing is "reached" across them.
    head = md.split("## Head to head")[1].split("## Config")[0]
    assert "different objectives" in head and "| optimizer | adamw, lr 0.003 | adamw, lr 0.003 |" in head
    assert "tokens to reach" not in head
    # Per-language tables: bits per byte for the decoder only, accuracy for both.
    bpb_table = md.split("### bits per byte")[1].split("###")[0]
    assert "| set | decoder |\n" in bpb_table and "| hi | 1." in bpb_table  # the encoder has no bits per byte
    accuracy_table = md.split("### accuracy")[1].split("\n\n")[1]
    assert accuracy_table.startswith("| set | decoder | encoder |\n")
    for figure in ("loss", "lr", "grad_norm", "tokens_per_s", "eval-bpb", "eval-accuracy"):
        assert (tmp_path / f"compare-{figure}.png").is_file(), figure
        assert f"(compare-{figure}.png)" in md
    assert html.count("data:image/png;base64,") == md.count("![")
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_sparse_run_shows_what_it_has_and_nothing_empty(sparse_run, tmp_path):
    html_path, md_path = make_report([sparse_run], tmp_path / "sparse.html")
    md = md_path.read_text()
    assert "## Curves" in md and "![loss](sparse-loss.png)" in md
    for absent in ("## Evaluation", "## Sample generations", "## Data and tokenizer", "learning rate",
                   "tokens seen", "wall time"):
        assert absent not in md, absent
    assert "1 update(s) skipped (non-finite loss) at step 3" in md
    assert "step 4: tracker 'wandb' failed at step 4" in md
    assert "<td></td>" not in html_path.read_text()  # one run: no cell is left empty


def test_metrics_an_objective_adds_get_their_own_curves(sparse_run, tmp_path):
    """A distillation run logs a KD loss next to the loss: it is drawn, per run, without being named here."""
    records = [{"step": s, "split": "train", "loss": 3.0 / s, "kd_loss": 2.0 / s} for s in (1, 2, 3)]
    (sparse_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, md_path = make_report([sparse_run], tmp_path / "kd.html")
    assert "![kd_loss](kd-kd_loss.png)" in md_path.read_text()


def test_fine_tuning_results_show_as_tables(sparse_run, tmp_path):
    """What `slmforge finetune` leaves: exact match and chrF in eval.json, prompt/reference/output rows
    in samples.jsonl."""
    step = sparse_run / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "objective": {"kind": "clm"}}))
    (step / "eval.json").write_text(json.dumps({"finetune_held_out": {
        "loss": 1.25, "ppl": 3.49, "examples": 2, "exact_match": 0.5, "chrf": 41.2, "step": 4}}))
    rows = [{"where": "qa.jsonl:1", "prompt": "2+2?", "reference": "4", "output": "4", "exact": True},
            {"where": "qa.jsonl:2", "prompt": "Capital of Assam?", "reference": "Dispur", "output": "Guwahati",
             "exact": False}]
    (sparse_run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, md_path = make_report([sparse_run], tmp_path / "ft.html")
    md = md_path.read_text()
    assert "| set | loss | perplexity | exact match | chrF |" in md
    assert "| finetune_held_out | 1.2500 | 3.4900 | 0.5000 | 41.2000 |" in md
    assert "| prompt | output | reference | exact |" in md and "| Capital of Assam? | Guwahati | Dispur | no |" in md
    assert "![evaluation: exact match](ft-eval-exact_match.png)" in md


def test_report_verb_writes_into_the_run_folder_by_default(two_runs, capsys):
    decoder, _, texts = two_runs
    assert main(["report", str(decoder / "checkpoints" / "step-000020"), "--text", f"hi={texts['hi']}"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(decoder / "plots" / "report.html"), str(decoder / "plots" / "report.md")]
    md = (decoder / "plots" / "report.md").read_text()
    assert "### Tokenizer report (measured now)" in md and "| hi | decoder |" in md


def test_runs_with_the_same_folder_name_are_told_apart(sparse_run, tmp_path):
    other = tmp_path / "b" / "sparse"
    shutil.copytree(sparse_run, other)
    html_path, _ = make_report([sparse_run, other], tmp_path / "same.html", write_markdown=False)
    html = html_path.read_text()
    assert f"{sparse_run.parent.name}/sparse" in html and "b/sparse" in html
    assert "The runs have the same resolved config." in html


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture
def page(tmp_path):
    page = Page(tmp_path / "chromium-profile")
    yield page
    page.close()


def pixels_of(image: np.ndarray, hex_color: str, tolerance: float = 0.06) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=-1) < tolerance).sum())


@needs_chromium
def test_the_checker_sees_console_errors_and_outside_requests(page, tmp_path):
    """The browser checks below can fail: a page with a console error and a remote image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("boom")</script>'
                   '<img src="http://127.0.0.1:9/x.png"></body></html>')
    page.open(bad.as_uri())
    problems = page.problems()
    assert any("boom" in p for p in problems) and any("127.0.0.1:9" in p for p in problems), problems


@needs_chromium
def test_two_runs_side_by_side_in_a_real_browser(two_runs, page, tmp_path):
    decoder, encoder, _ = two_runs
    html_path, _ = make_report([decoder, encoder], tmp_path / "report.html", write_markdown=False)
    page.open(html_path.as_uri())
    assert page.problems() == []
    images = page.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])")
    assert len(images) >= 6 and all(ok for ok, _ in images), images
    shot = page.screenshot()
    assert shot.std() > 0.05 and (shot.mean(axis=-1) < 0.9).mean() > 0.02  # not a blank page
    # Inside the loss figure, both runs' colours: the decoder's curve and the encoder's.
    box = page.evaluate("(() => { const r = document.querySelector('img[alt=\"loss\"]').getBoundingClientRect();"
                        " return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; })()")
    left, top, right, bottom = (round(v) for v in box)
    loss = shot[top:bottom, left:right]
    assert loss.shape[0] > 100 and loss.shape[1] > 200
    assert pixels_of(loss, RUN_COLORS[0]) > 300, "the first run's curve is not in the loss figure"
    assert pixels_of(loss, RUN_COLORS[1]) > 300, "the second run's curve is not in the loss figure"
    assert pixels_of(loss, RUN_COLORS[2]) < 50  # a third colour: no third run drawn


@needs_chromium
def test_a_run_with_missing_metrics_renders_in_a_real_browser(sparse_run, page, tmp_path):
    html_path, _ = make_report([sparse_run], tmp_path / "sparse.html", write_markdown=False)
    page.open(html_path.as_uri())
    assert page.problems() == []
    headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert headings == ["Runs", "Config", "Curves", "Warnings"]
    assert page.evaluate("document.images.length") == 1 and page.evaluate("document.images[0].naturalWidth") > 0
    shot = page.screenshot()
    assert pixels_of(shot, RUN_COLORS[0]) > 300


# ------------------------------------------------------------------------------------------ progress


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _two_updates(stream) -> None:
    from slmforge.data.progress import Progress

    progress = Progress("prepare", total_bytes=1000, stream=stream)
    progress.update(10, 100, 0, consumed=0, force=True)
    progress.update(20, 200, 500_000, consumed=500, new_text_bytes=500_000, force=True)
    progress.note("warning: 3 lines were not UTF-8")
    progress.finish("done")


def test_progress_redraws_on_a_terminal_prints_lines_in_logs_and_ci_and_is_silent_when_quiet(monkeypatch, capsys):
    from slmforge.formatting import say

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SLMFORGE_QUIET", raising=False)
    terminal, log_file = Stream(tty=True), Stream(tty=False)
    _two_updates(terminal)
    _two_updates(log_file)
    assert "\r" in terminal.getvalue() and "50%, ETA" in terminal.getvalue() and "MB/s" in terminal.getvalue()
    lines = log_file.getvalue().splitlines()
    assert "\r" not in log_file.getvalue() and len(lines) == 4 and "50%, ETA" in lines[1]

    monkeypatch.setenv("CI", "true")  # a CI log is a file even when the runner fakes a terminal
    ci = Stream(tty=True)
    _two_updates(ci)
    ci_lines = ci.getvalue().splitlines()
    assert "\r" not in ci.getvalue() and len(ci_lines) == 4 and "50%, ETA" in ci_lines[1]

    monkeypatch.setenv("SLMFORGE_QUIET", "1")
    quiet = Stream(tty=True)
    _two_updates(quiet)
    say("step 10/20")
    say("warning: something to know")
    assert quiet.getvalue() == "prepare: warning: 3 lines were not UTF-8\n"  # warnings only
    assert capsys.readouterr().err == "warning: something to know\n"
