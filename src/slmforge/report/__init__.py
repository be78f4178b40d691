"""`slmforge report`: one run, or several side by side, as a self-contained HTML page and as Markdown.

collect.py reads what a run folder holds, compare.py puts several runs head to head (tokens and seconds
to reach each other's final validation loss), figures.py draws the curves and bars, render.py writes the
HTML and Markdown, commands.py is the verb.
"""

from __future__ import annotations

from pathlib import Path

from slmforge.report.collect import RunFacts, collect, collect_all


def make_report(runs: list[str | Path], out: str | Path | None = None, markdown: str | Path | None = None,
                title: str | None = None, texts: dict[str, str] | None = None,
                max_lines: int | None = None, write_markdown: bool = True) -> tuple[Path, Path | None]:
    """Write the report of `runs`; returns (HTML path, Markdown path or None).

    Default places: one run -> RUN/plots/report.html; several -> ./report.html. The Markdown goes next
    to the HTML (same name, .md) with its figures as `<name>-<figure>.png` beside it. With `texts`
    (language -> text file) each run's tokenizer is measured on them (`slmforge tokenizer report`)."""
    from slmforge.errors import SlmforgeError
    from slmforge.fileio import make_readable, write_text_atomic
    from slmforge.report.render import build, to_html, to_markdown

    if not runs:
        raise SlmforgeError("report: name at least one run folder")
    facts = collect_all(runs)
    html_path = Path(out) if out else (facts[0].path / "plots" / "report.html" if len(facts) == 1
                                       else Path("report.html"))
    if html_path.is_dir():
        html_path = html_path / "report.html"
    title = title or "slmforge report: " + " vs ".join(r.name for r in facts)
    blocks = build(facts, title, _measure_tokenizers(facts, texts, max_lines) if texts else None)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(html_path, to_html(blocks, title, facts))
    if not write_markdown:
        return html_path, None
    md_path = Path(markdown) if markdown else html_path.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)

    def figure_path(figure) -> str:
        path = md_path.parent / f"{md_path.stem}-{figure.name}.png"
        path.write_bytes(figure.png)
        make_readable(path)
        return path.name

    write_text_atomic(md_path, to_markdown(blocks, title, figure_path))
    return html_path, md_path


def _measure_tokenizers(facts: list[RunFacts], texts: dict[str, str], max_lines: int | None) -> dict:
    """`slmforge tokenizer report` of every run's tokenizer, keyed by run name."""
    from slmforge.errors import SlmforgeError
    from slmforge.tokenizer.report import tokenizer_report

    with_tokenizer = [r for r in facts if (r.path / "tokenizer" / "tokenizer.json").is_file()]
    if not with_tokenizer:
        raise SlmforgeError("report --text: none of the runs has a tokenizer/ folder")
    report = tokenizer_report([r.path / "tokenizer" for r in with_tokenizer], texts, max_lines=max_lines)
    names = list(report["results"])  # in the order given
    report["results"] = {r.name: report["results"][n] for r, n in zip(with_tokenizer, names)}
    return report


__all__ = ["RunFacts", "collect", "collect_all", "make_report"]
