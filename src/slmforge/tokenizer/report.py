"""Compare tokenizers per language: how many tokens a word costs, and what gets lost.

Per (tokenizer, language):
  fertility         tokens per whitespace-separated word (lower is better; ~1.2-1.5 is good
                    for English, Indic scripts often get 3-6 from English-centric vocabularies)
  bytes_per_token   UTF-8 bytes per token (higher: more text per token, longer effective context)
  byte_fallback     share of tokens that are <0xNN> byte tokens (characters the vocabulary lacks)
  unk               share of tokens that are the unknown token (text destroyed)
  vocab_used        share of the vocabulary that occurs in the text
  roundtrip         share of lines that decode back to the same text, up to canonical equivalence
                    (NFC: precomposed फ़ and decomposed फ + ़ count as the same); lowercasing,
                    NFKC folding, stripped accents and lost whitespace count as changes
  akshara_split     share of distinct words in which a token starts inside an akshara (between a
                    consonant and its vowel sign, virama or nukta, inside a conjunct) or inside a
                    character (byte tokens); see akshara.py

Written as a printed table, report.json and report.png.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmforge.text.sources import SourceConfig
from slmforge.errors import SlmforgeError
from slmforge.tokenizer import akshara, pretokenize
from slmforge.tokenizer.sample import strict_lines
from slmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer

# (key, column title, shown as percent)
METRICS = [
    ("fertility", "tokens/word", False),
    ("bytes_per_token", "bytes/token", False),
    ("byte_fallback", "byte-fallback", True),
    ("unk", "unk", True),
    ("vocab_used", "vocab used", True),
    ("roundtrip", "roundtrip", True),
    ("akshara_split", "akshara split", True),
]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def measure(tok: Tokenizer, lines: Iterable[str], batch_size: int = 1024) -> dict[str, float | int]:
    """The metrics of `tok` on `lines` (each line encoded on its own, without special tokens)."""
    counts = {"lines": 0, "words": 0, "bytes": 0, "tokens": 0, "byte_tokens": 0, "unk_tokens": 0,
              "roundtrip_lines": 0}
    used: set[int] = set()
    words: set[str] = set()
    split_words: set[str] = set()
    batch: list[str] = []

    def flush() -> None:
        encodings = tok.backend.encode_batch(batch, add_special_tokens=False)
        encoded = [e.ids for e in encodings]
        decoded = tok.backend.decode_batch(encoded, skip_special_tokens=True)
        for line, encoding, ids, back in zip(batch, encodings, encoded, decoded):
            words.update(line.split())
            split_words.update(akshara.split_words(line, encoding.offsets))
            counts["lines"] += 1
            counts["words"] += len(line.split())
            counts["bytes"] += len(line.encode("utf-8"))
            counts["tokens"] += len(ids)
            counts["byte_tokens"] += sum(i in tok.byte_ids for i in ids)
            counts["unk_tokens"] += sum(i == tok.unk_id for i in ids) if tok.unk_id is not None else 0
            counts["roundtrip_lines"] += back == line or nfc(back) == nfc(line)
            used.update(ids)
        batch.clear()

    for line in lines:
        batch.append(line)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    tokens = counts["tokens"]
    return {
        **counts,
        "distinct_tokens": len(used),
        "fertility": tokens / counts["words"] if counts["words"] else 0.0,
        "bytes_per_token": counts["bytes"] / tokens if tokens else 0.0,
        "byte_fallback": counts["byte_tokens"] / tokens if tokens else 0.0,
        "unk": counts["unk_tokens"] / tokens if tokens else 0.0,
        "vocab_used": len(used) / tok.vocab_size,
        "roundtrip": counts["roundtrip_lines"] / counts["lines"] if counts["lines"] else 0.0,
        "distinct_words": len(words),
        "akshara_split": len(split_words) / len(words) if words else 0.0,
    }


def tokenizer_report(tokenizers: list[str | Path], texts: dict[str, str | Path],
                     out_dir: str | Path | None = None, max_lines: int | None = None) -> dict[str, Any]:
    """Measure every tokenizer on every language's text; optionally write report.json/.png."""
    if not tokenizers:
        raise SlmforgeError("tokenizer report: name at least one tokenizer folder")
    if not texts:
        raise SlmforgeError("tokenizer report: give at least one --text LANG=FILE")
    for lang, path in texts.items():
        if not Path(path).is_file():
            raise SlmforgeError(f"{path}: text file for {lang!r} not found")
    report: dict[str, Any] = {"tokenizers": {}, "texts": {k: str(v) for k, v in texts.items()}, "results": {}}
    for index, path in enumerate(tokenizers):
        name = _unique_name(index, tokenizers)
        tok = load_tokenizer(path)
        report["tokenizers"][name] = {
            "path": str(path), "kind": tok.kind, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
            "strips_marks": pretokenize.strips_marks(tok.backend.normalizer),
        }
        report["results"][name] = {lang: measure(tok, _read(text, max_lines)) for lang, text in texts.items()}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        (out / "report.txt").write_text(format_table(report) + "\n", encoding="utf-8")
        plot_report(report, out / "report.png")
    return report


def _unique_name(index: int, paths: list[str | Path]) -> str:
    """The tokenizer's folder name; numbered when two folders share a name."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]
    return names[index] if names.count(names[index]) == 1 else f"{names[index]}#{index + 1}"


def _read(path: str | Path, limit: int | None) -> Iterable[str]:
    """The file's lines (text, .jsonl, .parquet, compressed), at most `limit` of them."""
    for i, line in enumerate(strict_lines(SourceConfig(path=str(path)))):
        if limit is not None and i >= limit:
            return
        yield line


def format_table(report: dict[str, Any]) -> str:
    """Languages down, tokenizers side by side within each language, metrics across."""
    headers = ["language", "tokenizer"] + [title for _, title, _ in METRICS]
    rows = []
    for lang in report["texts"]:
        for i, (name, results) in enumerate(report["results"].items()):
            m = results[lang]
            cells = [f"{m[key] * 100:.1f}%" if pct else f"{m[key]:.2f}" for key, _, pct in METRICS]
            rows.append([lang if i == 0 else "", name] + cells)
    widths = [max(len(r[c]) for r in rows + [headers]) for c in range(len(headers))]
    lines = ["  ".join(h.ljust(w) if c < 2 else h.rjust(w) for c, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths)))
              for row in rows]
    for name, info in report["tokenizers"].items():
        if info["strips_marks"]:
            lines.append(f"note: {name} deletes combining marks (strip_accents): Indic virama, nukta "
                         f"and several vowel signs are lost")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """One bar chart per metric: languages on the x axis, one bar per tokenizer."""
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    langs = list(report["texts"])
    names = list(report["results"])
    fig = Figure(figsize=(4 * len(METRICS) // 2, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, (len(METRICS) + 1) // 2).ravel()
    width = 0.8 / len(names)
    for ax, (key, title, pct) in zip(axes, METRICS):
        for j, name in enumerate(names):
            values = [report["results"][name][lang][key] * (100 if pct else 1) for lang in langs]
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(langs))], values,
                   width, label=name)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylim(bottom=0)
        ax.set_title(title + (" (%)" if pct else ""))
    for ax in axes[len(METRICS):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=110)
