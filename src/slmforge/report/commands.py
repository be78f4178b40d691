"""`slmforge report`: one or more runs as a self-contained HTML page and a Markdown file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one run or several side by side as an HTML page (+ Markdown)",
                       description="Curves (loss, learning rate, gradient norm, tokens/s, MFU), evaluation tables\n"
                                   "and bars per set or language, the config diff between runs, data and\n"
                                   "tokenizer facts, sample generations, hardware, versions, wall time and the\n"
                                   "warnings the runs logged: one self-contained HTML page (figures embedded,\n"
                                   "nothing fetched) and the same as Markdown for a README. What a run did not\n"
                                   "record is left out.\n\n"
                                   "  slmforge report runs/hindi\n"
                                   "  slmforge report runs/vocab8k runs/vocab32k --out compare.html\n"
                                   "  slmforge report runs/adamw runs/muon --out optim.html  (head to head: tokens\n"
                                   "      to reach each other's final validation loss, curves against tokens)\n"
                                   "  slmforge report runs/teacher runs/student --text hi=hi.txt --text as=as.txt",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or checkpoint folders)")
    p.add_argument("--out", help="HTML file (default: RUN/plots/report.html for one run, ./report.html for "
                                 "several)")
    p.add_argument("--markdown", help="Markdown file (default: the HTML's path with .md; its figures are "
                                      "written next to it as NAME-FIGURE.png)")
    p.add_argument("--no-markdown", action="store_true", help="write the HTML page only")
    p.add_argument("--title", help="page title (default: the run names)")
    p.add_argument("--text", action="append", default=[], metavar="LANG=FILE",
                   help="also measure each run's tokenizer on this text (as `slmforge tokenizer report`); "
                        "repeatable")
    p.add_argument("--max-lines", type=int, help="read at most this many lines of each --text file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slmforge.errors import SlmforgeError
    from slmforge.report import make_report

    texts = {}
    for item in args.text:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise SlmforgeError(f"--text {item}: expected LANG=FILE")
        texts[lang] = path
    html_path, md_path = make_report(args.runs, args.out, args.markdown, args.title, texts or None,
                                     args.max_lines, write_markdown=not args.no_markdown)
    print(html_path)
    if md_path is not None:
        print(md_path)
    return 0
