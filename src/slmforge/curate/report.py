"""The curation report: per stage and per language, documents and bytes in and out, the top removal
reasons with a few removed examples each; as JSON and as one self-contained HTML page (inline CSS,
bars drawn with plain elements: no script, no network, no CDN).

It is assembled from the per-task stats files datatrove writes (out/.work/logs/<job>/stats/*.json),
which carry our `Tracked` counters and samples; so a resumed run reports the whole corpus.
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from slmforge.curate.config import CurateConfig
from slmforge.fileio import write_text_atomic

FORMAT = "slmforge-curate-report/1"
TOP_REASONS = 10

# The counters a stage's "details" show, by our own names, with what the page calls them. datatrove's
# own per-step statistics (doc_len, total, forwarded, dropped, ...) repeat what the in/out/removed
# columns already say in its terms: they stay in out/.work/logs/<job>/stats/ and never reach the report.
DETAIL_LABELS = {
    "html_stripped": "HTML documents whose tags were stripped",
    "skipped_other_language": "documents of other languages passed unchecked",
    "bengali_script_relabelled": "Bengali-script documents relabelled by their letters (ৰ ৱ: Assamese, র: Bengali)",
    "redacted_email": "email addresses redacted",
    "redacted_phone": "phone numbers redacted",
    "redacted_ip": "IP addresses redacted",
    "redacted_aadhaar": "Aadhaar numbers redacted",
    "redacted_pan": "PAN numbers redacted",
    "masked": "block-list matches masked",
    "lines_checked": "lines checked",
    "lines_kept": "lines kept",
}
_DATATROVE_NAMES = {"line-total": "lines_checked", "line-kept": "lines_kept"}  # C4's line counters


def detail_name(key: str) -> str | None:
    """A stage counter (`inner/` stripped) -> its name in the report, or None for one not shown."""
    key = _DATATROVE_NAMES.get(key, key)
    if key.startswith("line-filter-"):  # C4: lines removed by one rule
        return "lines_removed_" + key.removeprefix("line-filter-").replace("-", "_")
    return key if key in DETAIL_LABELS else None


def detail_label(name: str) -> str:
    if name.startswith("lines_removed_"):
        return "lines removed: " + name.removeprefix("lines_removed_").replace("_", " ")
    return DETAIL_LABELS.get(name, name.replace("_", " "))


def _details(counters: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in sorted(counters.items()):
        if not (key.startswith("inner/") or key == "skipped_other_language"):
            continue
        name = detail_name(key.removeprefix("inner/"))
        if name is not None:
            out[name] = out.get(name, 0) + int(value)
    return out


def _total(value: Any) -> float:
    return value.get("total", 0) if isinstance(value, dict) else value


def _read_stage_stats(log_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Stage -> {"counters": {key: total}, "samples": {reason: [...]}}, merged over tasks in rank order."""
    merged: dict[str, dict[str, Any]] = {}
    for logs in log_dirs:
        for path in sorted((logs / "stats").glob("*.json")):
            for step in json.loads(path.read_text(encoding="utf-8")):
                stage = step.get("curate_stage")
                if not stage:
                    continue
                entry = merged.setdefault(stage, {"counters": defaultdict(float), "samples": {}, "limit": 0})
                for key, value in step["stats"].items():
                    entry["counters"][key] += _total(value)
                for reason, samples in step.get("samples", {}).items():
                    entry["samples"].setdefault(reason, []).extend(samples)
    return merged


def read_summary(log_dirs: list[Path]) -> dict[str, Any]:
    """What the reader met, from the stats of the job(s) that read the inputs: input files, the skipped
    (unreadable) ones with why, sorted by path, and documents read."""
    read = _read_stage_stats(log_dirs).get("read", {"counters": {}, "samples": {}})
    c = read["counters"]
    return {"files": int(c.get("input_files", 0)), "bad_file_count": int(c.get("bad_files", 0)),
            "bad_files": sorted(read["samples"].get("bad_file", []), key=lambda b: b["file"]),
            "documents": int(c.get("documents", 0))}


def _by_language(counters: dict[str, float], prefix: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for key, value in counters.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] += value
    return out


def build_report(cfg: CurateConfig, log_dirs: list[Path], started: float) -> dict[str, Any]:
    merged = _read_stage_stats(log_dirs)
    limit = cfg.samples_per_reason
    read = merged.get("read", {"counters": {}, "samples": {}})
    stages = []
    for name in cfg.stages:
        entry = merged.get(name)
        if entry is None:
            continue
        c = entry["counters"]
        in_docs, in_bytes = _by_language(c, "in/docs/"), _by_language(c, "in/bytes/")
        out_docs, out_bytes = _by_language(c, "out/docs/"), _by_language(c, "out/bytes/")
        changed = _by_language(c, "changed/docs/")
        reasons: dict[str, dict[str, Any]] = {}
        for key, value in c.items():
            kind, _, rest = key.partition("/")
            if kind not in ("drop", "dropbytes"):
                continue
            reason, _, lang = rest.rpartition("/")
            r = reasons.setdefault(reason, {"reason": reason, "documents": 0, "bytes": 0, "by_language": {}})
            if kind == "drop":
                r["documents"] += int(value)
                r["by_language"][lang] = r["by_language"].get(lang, 0) + int(value)
            else:
                r["bytes"] += int(value)
        ranked = sorted(reasons.values(), key=lambda r: (-r["documents"], r["reason"]))
        for r in ranked:
            r["samples"] = entry["samples"].get(r["reason"], [])[:limit]
        languages = sorted(set(in_docs) | set(out_docs))
        stages.append({
            "name": name,
            "in": {"documents": int(sum(in_docs.values())), "bytes": int(sum(in_bytes.values()))},
            "out": {"documents": int(sum(out_docs.values())), "bytes": int(sum(out_bytes.values()))},
            "removed": {"documents": sum(r["documents"] for r in ranked), "bytes": sum(r["bytes"] for r in ranked)},
            "changed_documents": int(sum(changed.values())),
            "by_language": {lang: {"in_documents": int(in_docs.get(lang, 0)), "in_bytes": int(in_bytes.get(lang, 0)),
                                   "out_documents": int(out_docs.get(lang, 0)), "out_bytes": int(out_bytes.get(lang, 0)),
                                   "removed_documents": sum(r["by_language"].get(lang, 0) for r in ranked)}
                            for lang in languages},
            "reasons": ranked[:TOP_REASONS],
            "other_reasons": len(ranked) - len(ranked[:TOP_REASONS]),
            "details": _details(c),
        })
    rc = read["counters"]
    input_docs, input_bytes = int(rc.get("documents", 0)), 0
    if stages:
        input_bytes = stages[0]["in"]["bytes"]
        input_docs = stages[0]["in"]["documents"] or input_docs
    if stages:
        last = stages[-1]
        output = {"documents": last["out"]["documents"], "bytes": last["out"]["bytes"],
                  "by_language": {lang: {"documents": v["out_documents"], "bytes": v["out_bytes"]}
                                  for lang, v in last["by_language"].items() if v["out_documents"]}}
    else:
        output = {"documents": input_docs, "bytes": input_bytes, "by_language": {}}
    output["kept_documents_pct"] = 100 * output["documents"] / input_docs if input_docs else 0.0
    output["kept_bytes_pct"] = 100 * output["bytes"] / input_bytes if input_bytes else 0.0
    seconds = max(time.time() - started, 1e-9)
    return {
        "format": FORMAT,
        "config": dataclasses.asdict(cfg),
        "input": {"files": int(rc.get("input_files", 0)), "documents": input_docs, "bytes": input_bytes,
                  "bad_files": read["samples"].get("bad_file", []), "bad_file_count": int(rc.get("bad_files", 0)),
                  "unusable_records": int(rc.get("unusable_records", 0)),
                  "unusable_record_files": read["samples"].get("unusable_records", [])},
        "output": output,
        "stages": stages,
        "timing": {"seconds": round(seconds, 3), "docs_per_s": input_docs / seconds,
                   "mb_per_s": input_bytes / 1e6 / seconds,
                   "note": "wall time of the run that finished the curation (a resumed run counts only itself)"},
    }


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Noto Sans","Noto Sans Devanagari","Noto Sans Bengali",sans-serif;
margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .6em;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child{text-align:left}.bar{display:inline-block;height:.9em;background:#4a7bd0;
vertical-align:middle}.bar.drop{background:#d0654a}.track{display:inline-block;width:320px;background:#f1f1f1}
.num{font-variant-numeric:tabular-nums}details{margin:.3em 0}pre{white-space:pre-wrap;background:#f7f7f7;
padding:.5em;border-left:3px solid #d0654a;font-size:.9em}.muted{color:#777}
"""


def _bar(value: float, top: float, cls: str = "") -> str:
    width = 0 if top <= 0 else max(0.0, min(100.0, 100 * value / top))
    return f'<span class="track"><span class="bar {cls}" style="width:{width:.1f}%"></span></span>'


def size(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as MB/s is)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:,.2f} TB"


_mb = size


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    inp, out = report["input"], report["output"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>slmforge data curate report"
             f"</title><style>{_CSS}</style></head><body>",
             "<h1>Curation report</h1>",
             f"<p>{inp['documents']:,} documents ({_mb(inp['bytes'])}) from {inp['files']:,} file(s) in; "
             f"<b>{out['documents']:,} documents ({_mb(out['bytes'])}) kept</b>: "
             f"{out['kept_documents_pct']:.1f}% of documents, {out['kept_bytes_pct']:.1f}% of bytes. "
             f"{report['timing']['seconds']:.1f} s, {report['timing']['docs_per_s']:,.0f} docs/s, "
             f"{report['timing']['mb_per_s']:.2f} MB/s.</p>"]
    if inp.get("unusable_records"):
        parts.append(f"<p>{inp['unusable_records']:,} JSONL record(s) gave no document (not JSON, or no text): "
                     + ", ".join(f"<code>{e(x['file'])}</code> ({x['records']:,})" for x in inp["unusable_record_files"])
                     + "</p>")
    if inp["bad_file_count"]:
        parts.append(f"<h2>Skipped input files ({inp['bad_file_count']})</h2><ul>")
        parts += [f"<li><code>{e(b['file'])}</code>: {e(b['error'])}</li>" for b in inp["bad_files"]]
        parts.append("</ul>")
    stages = report["stages"]
    if stages:
        top = max(s["in"]["documents"] for s in stages) or 1
        parts.append("<h2>Documents kept after each stage</h2><table><tr><th>stage</th><th>in</th><th>out</th>"
                     "<th>removed</th><th></th></tr>")
        for s in stages:
            parts.append(f"<tr><td>{e(s['name'])}</td><td class=num>{s['in']['documents']:,}</td>"
                         f"<td class=num>{s['out']['documents']:,}</td><td class=num>{s['removed']['documents']:,}</td>"
                         f"<td>{_bar(s['out']['documents'], top)}</td></tr>")
        parts.append("</table>")
    if out["by_language"]:
        top = max(v["documents"] for v in out["by_language"].values()) or 1
        parts.append("<h2>Output by language</h2><table><tr><th>language</th><th>documents</th><th>bytes</th>"
                     "<th></th></tr>")
        for lang, v in sorted(out["by_language"].items(), key=lambda kv: -kv[1]["documents"]):
            parts.append(f"<tr><td>{e(lang)}</td><td class=num>{v['documents']:,}</td><td class=num>{_mb(v['bytes'])}"
                         f"</td><td>{_bar(v['documents'], top)}</td></tr>")
        parts.append("</table>")
    for s in stages:
        parts.append(f"<h2>Stage <code>{e(s['name'])}</code></h2>"
                     f"<p>{s['in']['documents']:,} in ({_mb(s['in']['bytes'])}), {s['out']['documents']:,} out "
                     f"({_mb(s['out']['bytes'])}), {s['removed']['documents']:,} removed"
                     + (f", {s['changed_documents']:,} changed" if s["changed_documents"] else "") + ".</p>")
        parts.append("<table><tr><th>language</th><th>in</th><th>out</th><th>removed</th><th>bytes in</th>"
                     "<th>bytes out</th><th>kept</th></tr>")
        for lang, v in s["by_language"].items():
            kept = v["out_documents"] / v["in_documents"] if v["in_documents"] else 0
            parts.append(f"<tr><td>{e(lang)}</td><td class=num>{v['in_documents']:,}</td>"
                         f"<td class=num>{v['out_documents']:,}</td><td class=num>{v['removed_documents']:,}</td>"
                         f"<td class=num>{_mb(v['in_bytes'])}</td><td class=num>{_mb(v['out_bytes'])}</td>"
                         f"<td>{_bar(kept, 1)} {100 * kept:.1f}%</td></tr>")
        parts.append("</table>")
        if s["reasons"]:
            top = s["reasons"][0]["documents"] or 1
            parts.append("<h3>Why documents were removed</h3><table><tr><th>reason</th><th>documents</th>"
                         "<th>bytes</th><th>by language</th><th></th></tr>")
            for r in s["reasons"]:
                langs = ", ".join(f"{e(k)} {v:,}" for k, v in sorted(r["by_language"].items(), key=lambda kv: -kv[1]))
                parts.append(f"<tr><td>{e(r['reason'])}</td><td class=num>{r['documents']:,}</td>"
                             f"<td class=num>{_mb(r['bytes'])}</td><td>{langs}</td>"
                             f"<td>{_bar(r['documents'], top, 'drop')}</td></tr>")
            parts.append("</table>")
            if s["other_reasons"]:
                parts.append(f"<p class=muted>{s['other_reasons']} more reason(s) in report.json.</p>")
            for r in s["reasons"]:
                if r["samples"]:
                    parts.append(f"<details><summary>{len(r['samples'])} removed example(s): {e(r['reason'])}"
                                 "</summary>")
                    parts += [f"<p class=muted>{e(x.get('language', ''))} · {e(str(x.get('file', '')))}</p>"
                              f"<pre>{e(x.get('text', ''))}</pre>" for x in r["samples"]]
                    parts.append("</details>")
        if s["details"]:
            parts.append("<p class=muted>" + ", ".join(f"{e(detail_label(k))}: {v:,}" for k, v in s["details"].items())
                         + "</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(report: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, render_html(report))
