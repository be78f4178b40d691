"""The report: one table of slmforge / baseline ratios, printed and written as JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import Row


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "n/a"
    better = "higher is better" if row.higher_is_better else "lower is better"
    return f"{row.ratio:.2f}x ({better})"


def markdown(rows: list[Row], env: dict, title: str) -> str:
    lines = [f"## {title}", "",
             f"{env['date']} · {env['device']} ({env['device_name']}) · torch {env['torch']} · transformers "
             f"{env['transformers']} · {env['threads']} torch threads of {env['cpu_count']} cores · shapes "
             f"`{env['shapes']}` · {env['dtype']}{' · compiled' if env.get('compile') else ''} · load average "
             f"{env.get('load_average_start', 'n/a')} at start, {env.get('load_average_end', 'n/a')} at end", "",
             "Ratio = slmforge / baseline.", "",
             "| measurement | case | metric | slmforge | baseline | ratio |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.measurement} | {row.case} | {row.metric} | {_number(row.slmforge)} | "
                     f"{row.baseline_name}: {_number(row.baseline)} | {_ratio(row)} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {row.measurement} · {row.case} · {row.metric}: {row.notes}" for row in rows if row.notes]
    return "\n".join(lines) + "\n"


def text_table(rows: list[Row]) -> str:
    header = ("measurement", "case", "metric", "slmforge", "baseline", "ratio")
    cells = [header] + [(r.measurement, r.case, r.metric, _number(r.slmforge),
                         f"{_number(r.baseline)} ({r.baseline_name})", _ratio(r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


def write(rows: list[Row], env: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{env['device'].replace(':', '')}-{env['shapes']}-{env['dtype']}-{env['threads']}threads"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps({"environment": env, "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    md_path.write_text(markdown(rows, env, "slmforge vs transformers"))
    return json_path, md_path
