"""One report, two renderings: a self-contained HTML page (figures embedded as data: URIs, inline CSS,
no script, nothing fetched) and Markdown for a README (figures as PNG files next to it).

Both walk the same list of blocks, so they show the same things; a section, column or row whose
data no run has is not made at all (never shown empty).
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from slmforge.report.collect import RunFacts, config_diff, eval_columns, flatten
from slmforge.report.compare import head_to_head, same_objective
from slmforge.report.figures import Figure, color, make_figures


@dataclass
class Block:
    kind: str  # h2, h3, p, table, figures, pre, list, details
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    children: list["Block"] = field(default_factory=list)


def build(runs: list[RunFacts], title: str, tokenizer_report: dict[str, Any] | None = None) -> list[Block]:
    """The report's content, in order."""
    blocks = [Block("h2", "Runs"), _summary(runs)]
    blocks += _head_to_head(runs)
    blocks += _config(runs)
    figures = make_figures(runs)
    curves = [f for f in figures if not f.name.startswith("eval-")]
    if curves:
        blocks += [Block("h2", "Curves"), Block("figures", figures=curves)]
    blocks += _evaluation(runs, [f for f in figures if f.name.startswith("eval-")])
    blocks += _data_and_tokenizer(runs, tokenizer_report)
    blocks += _samples(runs)
    blocks += _warnings(runs)
    return blocks


def _summary(runs: list[RunFacts]) -> Block:
    summaries = [r.summary() for r in runs]
    labels = list(dict.fromkeys(label for s in summaries for label in s))
    rows = [["folder", *[str(r.path) for r in runs]]]
    rows += [[label, *[s.get(label, "") for s in summaries]] for label in labels]
    return Block("table", headers=["", *[r.name for r in runs]], rows=rows)


def _head_to_head(runs: list[RunFacts]) -> list[Block]:
    table = head_to_head(runs)
    if table is None:
        return []
    headers, rows = table
    text = ("Tokens trained and wall seconds of training each run needed to reach each run's final validation "
            "loss (linear between evaluations; in brackets, as a share of what that run itself needed); the "
            "figure \"validation loss against tokens\" under Curves shows the same." if same_objective(runs) else
            "The runs train different objectives (objective.kind), so no run's loss is a target for another.")
    return [Block("h2", "Head to head"), Block("p", text), Block("table", headers=headers, rows=rows)]


def _config(runs: list[RunFacts]) -> list[Block]:
    with_config = [r for r in runs if r.config]
    if not with_config:
        return []
    blocks = [Block("h2", "Config")]
    if len(with_config) > 1:
        diff = config_diff(with_config)
        if diff:
            blocks.append(Block("p", "Resolved config fields that differ between runs:"))
            blocks.append(Block("table", headers=["field", *[r.name for r in with_config]],
                                rows=[[k, *[_value(v) for v in values]] for k, values in diff.items()]))
        else:
            blocks.append(Block("p", "The runs have the same resolved config."))
    for run in with_config:
        text = "\n".join(f"{k} = {_value(v)}" for k, v in flatten(run.config).items())
        blocks.append(Block("details", f"full resolved config of {run.name} (config.toml)",
                            children=[Block("pre", text)]))
    return blocks


def _evaluation(runs: list[RunFacts], bars: list[Figure]) -> list[Block]:
    columns = eval_columns(runs)
    if not columns:
        return []
    blocks = [Block("h2", "Evaluation")]
    sources = [f"{r.name}: {r.eval_step_dir.name}/eval.json" for r in runs if r.eval_step_dir is not None]
    blocks.append(Block("p", "From " + "; ".join(sources) + "."))
    sets = list(dict.fromkeys(name for r in runs for name in r.evals))
    if len(runs) == 1:
        run = runs[0]
        rows = [[name, *[_metric(run.evals[name].get(key)) for key, _ in columns],
                 _int(run.evals[name].get("tokens"))] for name in sets]
        show_tokens = any(r[-1] for r in rows)
        headers = ["set", *[label for _, label in columns]] + (["tokens"] if show_tokens else [])
        blocks.append(Block("table", headers=headers, rows=[r if show_tokens else r[:-1] for r in rows]))
    else:
        for key, label in columns:  # one table per metric: sets down, the runs that have it across
            having = [r for r in runs if any(_metric(row.get(key)) for row in r.evals.values())]
            rows = [[name, *[_metric((r.evals.get(name) or {}).get(key)) for r in having]] for name in sets]
            rows = [row for row in rows if any(row[1:])]
            blocks.append(Block("h3", label))
            blocks.append(Block("table", headers=["set", *[r.name for r in having]], rows=rows))
    if bars:
        blocks.append(Block("figures", figures=bars))
    return blocks


def _data_and_tokenizer(runs: list[RunFacts], comparison: dict[str, Any] | None) -> list[Block]:
    from slmforge.tokenizer.report import METRICS

    blocks: list[Block] = []
    labels = {"kind": "kind", "vocab_size": "vocabulary", "tokenizer_sha256": "sha256"}
    tok_rows = []
    for key, label in labels.items():
        values = [str(r.tokenizer.get(key, "")) for r in runs]
        if any(values):
            tok_rows.append([label, *[v[:16] if key == "tokenizer_sha256" else v for v in values]])
    specials = [", ".join(f"{role} {_tokens(tok)}"
                          for role, tok in (r.tokenizer.get("special_tokens") or {}).items()) for r in runs]
    if any(specials):
        tok_rows.append(["special tokens", *specials])
    data_rows = []
    splits = list(dict.fromkeys(s for r in runs for s in (r.data.get("splits") or {})))
    for split in splits:
        for key in ("tokens", "documents", "bytes"):
            values = [(r.data.get("splits") or {}).get(split, {}).get(key) for r in runs]
            if any(v is not None for v in values):
                data_rows.append([f"{split} {key}", *[_int(v) for v in values]])
        tokens = [(r.data.get("splits") or {}).get(split, {}) for r in runs]
        if any(t.get("tokens") and t.get("bytes") for t in tokens):
            data_rows.append([f"{split} bytes/token", *[f"{t['bytes'] / t['tokens']:.2f}" if t.get("tokens") and
                                                        t.get("bytes") else "" for t in tokens]])
    reports = [(r.name, r.tokenizer_report) for r in runs if r.tokenizer_report]
    if comparison:
        reports = [("measured now", comparison)]
    if not (tok_rows or data_rows or reports):
        return []
    blocks.append(Block("h2", "Data and tokenizer"))
    if tok_rows:
        blocks.append(Block("table", headers=["tokenizer", *[r.name for r in runs]], rows=tok_rows))
    if data_rows:
        blocks.append(Block("table", headers=["data", *[r.name for r in runs]], rows=data_rows))
    for name, report in reports:
        results = report.get("results") or {}
        present = [(k, title, pct) for k, title, pct in METRICS
                   if any(k in m for per_lang in results.values() for m in per_lang.values())]
        rows = []
        for tok_name, per_lang in results.items():
            for lang, m in per_lang.items():
                rows.append([lang, tok_name, *[(f"{100 * m[k]:.1f}%" if pct else f"{m[k]:.2f}") if k in m else ""
                                               for k, _, pct in present]])
        rows.sort(key=lambda r: r[0])
        if rows:
            texts = ", ".join(f"{k}: {v}" for k, v in (report.get("texts") or {}).items())
            blocks.append(Block("h3", f"Tokenizer report ({name})"))
            if texts:
                blocks.append(Block("p", f"Text: {texts}."))
            blocks.append(Block("table", headers=["language", "tokenizer", *[t for _, t, _ in present]], rows=rows))
    return blocks


SHOWN_SAMPLES = 10  # sample generations shown per run; the rest are counted and named by file
MIN_SPECIAL_RUN = 4  # this many special tokens in a row are shown as one short run

# Special tokens as models print them: T5's sentinels, <|...|> markers, <s> </s> <pad> <unk> <mask>
# and BERT's [MASK] [PAD] ...; a run's own special tokens (tokenizer/) are added to these.
_SPECIAL = (r"<extra_id_\d+>|<sentinel_\d+>|<\|[^|<>\s]{1,40}\|>|</?s>|<(?:pad|unk|mask|bos|eos|sep|cls)>"
            r"|\[(?:PAD|MASK|UNK|CLS|SEP|BOS|EOS)\]")
_NUMBERED = re.compile(r"<(extra_id|sentinel)_(\d+)>")


def special_tokens_pattern(extra: list[str] | tuple[str, ...] = ()) -> str:
    """A regex for one special token: the usual ones plus `extra` (a run's own, from tokenizer/)."""
    own = sorted({t for t in extra if isinstance(t, str) and t.strip()}, key=len, reverse=True)
    return "|".join([_SPECIAL, *(re.escape(t) for t in own)])


def collapse_special_tokens(text: str, token: str = _SPECIAL) -> str:
    """Each run of MIN_SPECIAL_RUN or more special tokens (`token`, a regex; spaces between allowed) as
    its first and last and a count: "<extra_id_0>…<extra_id_99> (100 sentinels)", "<pad>…<pad> (37 ×
    <pad>)", "<s>…</s> (12 special tokens)"."""
    one = re.compile(token)
    runs = re.compile(rf"(?:{token})(?:\s*(?:{token})){{{MIN_SPECIAL_RUN - 1},}}")

    def short(match: re.Match) -> str:
        tokens = one.findall(match.group(0))
        first, last = tokens[0], tokens[-1]
        if all(_NUMBERED.fullmatch(t) for t in tokens):
            what = f"{len(tokens)} sentinels"
        elif len(set(tokens)) == 1:
            what = f"{len(tokens)} × {first}"
        else:
            what = f"{len(tokens)} special tokens"
        return f"{first}…{last} ({what})"

    return runs.sub(short, text)


def _samples(runs: list[RunFacts]) -> list[Block]:
    with_samples = [r for r in runs if r.samples]
    if not with_samples:
        return []
    blocks = [Block("h2", "Sample generations")]
    for run in with_samples:
        if len(runs) > 1:
            blocks.append(Block("h3", run.name))
        own = [t for v in (run.tokenizer.get("special_tokens") or {}).values()
               for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
        token = special_tokens_pattern(own)

        def shown(text: str, token: str = token) -> str:
            return collapse_special_tokens(text, token)

        samples = run.samples[:SHOWN_SAMPLES]
        lines = [shown(s["text"]) for s in samples if "text" in s]
        if lines:
            blocks.append(Block("pre", "\n".join(lines)))
        pairs = [s for s in samples if "output" in s]
        if pairs:  # prompt and output (+ the reference and whether it matched, from fine-tuning)
            extra = [k for k in ("reference", "exact") if any(k in s for s in pairs)]
            rows = [[shown(s["prompt"]), shown(s["output"]),
                     *[shown(_cell(s.get(k))) for k in extra]] for s in pairs]
            blocks.append(Block("table", headers=["prompt", "output", *extra], rows=rows))
        total = max(run.samples_total, len(run.samples))
        if total > len(samples):
            blocks.append(Block("p", f"… {total - len(samples):,} more in {run.samples_file or 'the run folder'} "
                                     f"({len(samples)} of {total:,} shown)."))
    return blocks


def _tokens(value: Any) -> str:
    """A special token, or a list of them (T5's 100 sentinels) as its first and last and a count."""
    if isinstance(value, list):
        if len(value) >= MIN_SPECIAL_RUN:
            return f"{value[0]}…{value[-1]} ({len(value)})"
        return " ".join(str(v) for v in value)
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def _warnings(runs: list[RunFacts]) -> list[Block]:
    found = [(r, r.warnings()) for r in runs]
    if not any(w for _, w in found):
        return []
    blocks = [Block("h2", "Warnings")]
    for run, items in found:
        if items:
            if len(runs) > 1:
                blocks.append(Block("h3", run.name))
            blocks.append(Block("list", items=items))
    return blocks


# ------------------------------------------------------------------------------------------ HTML

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "Noto Sans", sans-serif; margin: 24px auto;
       max-width: 1360px; padding: 0 16px; color: #1b1b1b; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-bottom: 6px; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; white-space: pre-wrap; }
details { margin: 6px 0; } summary { cursor: pointer; }
"""


def to_html(blocks: list[Block], title: str, runs: list[RunFacts]) -> str:
    from slmforge import __version__

    swatches = " ".join(f'<span class="swatch" style="background:{color(i)}"></span>{html.escape(r.name)}'
                        for i, r in enumerate(runs))
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            f'<p class="subtitle">{swatches} &middot; made by slmforge {html.escape(__version__)} on '
            f"{time.strftime('%Y-%m-%d %H:%M')}</p>\n")
    return head + "".join(_html_block(b, runs) for b in blocks) + "</body>\n</html>\n"


def _html_block(block: Block, runs: list[RunFacts]) -> str:
    esc = html.escape
    if block.kind in ("h2", "h3"):
        return f"<{block.kind}>{esc(block.text)}</{block.kind}>\n"
    if block.kind == "p":
        return f"<p>{esc(block.text)}</p>\n"
    if block.kind == "pre":
        return f"<pre>{esc(block.text)}</pre>\n"
    if block.kind == "list":
        return "<ul>\n" + "".join(f"<li>{esc(item)}</li>\n" for item in block.items) + "</ul>\n"
    if block.kind == "details":
        return (f"<details><summary>{esc(block.text)}</summary>\n"
                + "".join(_html_block(b, runs) for b in block.children) + "</details>\n")
    if block.kind == "table":
        names = {r.name: i for i, r in enumerate(runs)}
        header = "".join(f"<th>{_swatch(names[h]) if h in names else ''}{esc(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f'<td{" class=num" if _is_number(c) else ""}>{esc(c)}</td>' for c in row)
                       + "</tr>\n" for row in block.rows)
        return f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"
    if block.kind == "figures":
        items = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(f.png).decode("ascii")}" '
                        f'alt="{esc(f.title)}"></figure>\n' for f in block.figures)
        return f'<div class="figures">\n{items}</div>\n'
    raise ValueError(block.kind)


def _swatch(index: int) -> str:
    return f'<span class="swatch" style="background:{color(index)}"></span>'


# ------------------------------------------------------------------------------------------ Markdown


def to_markdown(blocks: list[Block], title: str, figure_path) -> str:
    """Markdown; `figure_path(figure)` writes a figure's PNG and returns the path to link to."""
    lines = [f"# {title}", ""]
    for block in blocks:
        lines += _md_block(block, figure_path)
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block: Block, figure_path) -> list[str]:
    if block.kind == "h2":
        return [f"## {block.text}", ""]
    if block.kind == "h3":
        return [f"### {block.text}", ""]
    if block.kind == "p":
        return [block.text, ""]
    if block.kind == "pre":
        fence = "````" if "```" in block.text else "```"
        return [fence, block.text, fence, ""]
    if block.kind == "list":
        return [f"- {item}" for item in block.items] + [""]
    if block.kind == "details":
        inner = [line for b in block.children for line in _md_block(b, figure_path)]
        return [f"<details><summary>{html.escape(block.text)}</summary>", "", *inner, "</details>", ""]
    if block.kind == "table":
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        out = ["| " + " | ".join(cell(h) for h in block.headers) + " |",
               "|" + "|".join("---:" if i and all(_is_number(r[i]) or not r[i] for r in block.rows) else "---"
                              for i in range(len(block.headers))) + "|"]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
        return out + [""]
    if block.kind == "figures":
        return [f"![{f.title}]({figure_path(f)})" for f in block.figures] + [""]
    raise ValueError(block.kind)


# ------------------------------------------------------------------------------------------ cells


def _metric(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else ""


def _value(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False
