"""The `[curate]` section: inputs, the ordered stages and one sub-section per stage.

Plain dataclasses (no datatrove import), so `--show-fields` and recipe validation work without the
`curate` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slmforge import config
from slmforge.config import require

SECTION = "curate"

# Stages that look at one document at a time, in any order the user lists them, then the two dedup
# stages (whole-corpus jobs), which must come last and in this order.
DOC_STAGES = ("html", "normalize", "script", "language", "quality", "gopher_quality", "gopher_repetition", "c4",
              "fineweb", "pii", "blocklist")
DEDUP_STAGES = ("exact_dedup", "near_dedup")
STAGES = DOC_STAGES + DEDUP_STAGES
DEFAULT_STAGES = ["html", "normalize", "script", "language", "quality", "pii", "blocklist", "exact_dedup", "near_dedup"]


@dataclass
class InputConfig:
    """One input of `data curate`."""

    path: str
    """A file, a folder (read recursively, sorted, hidden files skipped) or a glob (`raw/**/*.jsonl.gz`)."""
    lang: str = "und"
    """Language you expect there (e.g. `hi`); the document's language until the `language` stage sets it."""
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    """`auto`: .jsonl/.json/.ndjson are JSONL, .parquet is Parquet, anything else is text (after .gz/.zst)."""
    text_field: str = "text"
    """Field holding the text in JSONL records and Parquet columns."""
    text_unit: Literal["line", "paragraph", "file"] = "line"
    """Text files only: a document is one line, one blank-line-separated paragraph, or one whole file."""

    def validate(self) -> None:
        require(bool(self.path.strip()), "path", "must not be empty")
        require(bool(self.text_field), "text_field", "must not be empty")


@dataclass
class HtmlConfig:
    """[curate.html]: a document that still carries its HTML (`<p>...</p>`, `<div class=...>`, `&amp;`)
    becomes its text: tags removed, the content of script, style, head and comments dropped, entities
    unescaped, paragraphs and other block elements kept as line breaks (`slmforge.curate.markup`). Text
    without markup passes untouched; a document with no text left is removed ("empty_html")."""

    detect: Literal["auto", "always"] = "auto"
    """`auto`: only documents that look like HTML (a doctype or <html>, or at least `min_tags` known
    tags such as <p>, </div>, <br/>); `always`: read every document as HTML (a dump of raw pages)."""
    min_tags: int = 2
    """Known HTML tags (opening, closing or self-closing) that make a document look like HTML with
    detect = "auto"; 2 keeps a sentence that mentions one tag (`use <b> for bold`) as it is."""

    def validate(self) -> None:
        require(self.min_tags >= 1, "min_tags", f"must be >= 1, got {self.min_tags}")


@dataclass
class NormalizeConfig:
    """[curate.normalize]: Unicode form, mojibake repair, control characters and whitespace."""

    form: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalization form. NFC composes (e.g. Devanagari nukta forms) without changing meaning."""
    fix_mojibake: bool = True
    """Repair text decoded with the wrong codec (`à¤¹à¤¿` back to `हि`), HTML entities and terminal
    escapes, with ftfy (through datatrove's FTFYFormatter)."""
    whitespace: bool = True
    """Spaces and tabs collapse to one space, lines are stripped, 3+ newlines become 2, zero-width spaces
    and byte order marks go (ZWJ and ZWNJ stay: they change how Indic conjuncts render)."""


@dataclass
class ScriptConfig:
    """[curate.script]: script shares per document (metadata `script`, `script_shares`,
    `romanized_hindi`); with `keep` or `min_share`, a filter."""

    keep: list[str] = field(default_factory=list)
    """Keep only documents whose main script is one of these ISO 15924 codes (`Deva`, `Beng`, `Latn`,
    ...); empty = keep every script."""
    min_share: float = 0.0
    """Drop a document whose main script has less than this share of its letters (mixed-script noise)."""
    drop_romanized_hindi: bool = False
    """Drop documents flagged as Hindi in Latin letters (they are always flagged in the metadata)."""
    romanized_min_ratio: float = 0.2
    """Share of words that must be Hindi function words (hai, nahi, kya, ...) to flag romanized Hindi."""

    def validate(self) -> None:
        require(0 <= self.min_share <= 1, "min_share", f"must be in [0, 1], got {self.min_share}")
        require(0 < self.romanized_min_ratio <= 1, "romanized_min_ratio",
                f"must be in (0, 1], got {self.romanized_min_ratio}")


@dataclass
class LanguageConfig:
    """[curate.language]: language ID (metadata `language`, `language_score`); with `keep`, a filter."""

    model: str = "py3langid"
    """`py3langid` (ships its model inside the package: nothing is downloaded) or `fasttext:PATH` for a
    fastText model file such as lid.176.bin or GlotLID (needs `pip install fasttext`)."""
    keep: list[str] = field(default_factory=list)
    """Keep only these languages (ISO 639-1, e.g. ["hi"]); empty = keep all. Romanized Hindi is `hi-Latn`."""
    candidates: list[str] = field(default_factory=list)
    """Restrict the model to these languages (py3langid only); empty = all 97 it knows."""
    min_score: float = 0.0
    """Documents whose best language scores below this are labelled `und`."""

    def validate(self) -> None:
        require(self.model == "py3langid" or self.model.startswith("fasttext:"), "model",
                f"must be 'py3langid' or 'fasttext:PATH', got {self.model!r}")
        require(0 <= self.min_score <= 1, "min_score", f"must be in [0, 1], got {self.min_score}")


@dataclass
class QualityThresholds:
    """Quality thresholds for one language; an unset field takes that language's default (see
    `slmforge.curate.quality`). 0 turns a minimum off; 1 turns a ratio maximum off."""

    min_words: int | None = None
    """Fewest words (runs of letters, marks and digits) a document may have."""
    max_words: int | None = None
    """Most words; 0 = no limit."""
    min_mean_word_length: float | None = None
    """Lowest mean word length in code points (a Devanagari vowel sign counts as one)."""
    max_mean_word_length: float | None = None
    """Highest mean word length; 0 = no limit."""
    min_stop_words: int | None = None
    """Fewest stop-word occurrences (built-in lists for hi, as, bn, en, de; others skip this rule)."""
    stop_words: list[str] | None = None
    """Your own stop-word list for this language, replacing the built-in one."""
    max_symbol_ratio: float | None = None
    """Highest share of symbol characters (# * | { } @ ..., Unicode symbols) among non-space characters."""
    max_digit_ratio: float | None = None
    """Highest share of digits among non-space characters."""
    max_duplicate_line_fraction: float | None = None
    """Highest share of lines that repeat an earlier line (documents of 3+ lines)."""
    max_top_2gram_fraction: float | None = None
    """Highest share of word characters covered by the most frequent word 2-gram (documents of 20+ words)."""
    max_duplicate_5gram_fraction: float | None = None
    """Highest share of word characters inside word 5-grams that occur more than once (20+ words)."""


@dataclass
class QualityConfig:
    """[curate.quality]: per-language thresholds, e.g. `[curate.quality.languages.hi] min_words = 5`
    (`"*"` for every language without its own table)."""

    languages: dict[str, QualityThresholds] = field(default_factory=dict)
    """Per-language overrides of the built-in defaults (hi, as, bn, en, de, and generic ones for others)."""


@dataclass
class DatatroveFilterConfig:
    """[curate.gopher_quality], [curate.gopher_repetition], [curate.c4], [curate.fineweb]: datatrove's
    own filters with their published defaults, run on the documents of `languages` only."""

    languages: list[str] = field(default_factory=lambda: ["en", "de"])
    """Apply the filter to documents of these languages (their rules and stop words are English-centric);
    other documents pass untouched. ["*"] = every document."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the datatrove filter, e.g. { min_doc_words = 20 } for gopher_quality."""


@dataclass
class PiiConfig:
    """[curate.pii]: replace personal data with placeholders (`<EMAIL>`, `<PHONE>`, ...)."""

    kinds: list[Literal["email", "phone", "ip", "aadhaar", "pan"]] = field(
        default_factory=lambda: ["email", "phone", "ip", "aadhaar", "pan"])
    """What to redact."""
    only_public_ips: bool = False
    """Leave private and reserved IP addresses (192.168.x.x, 127.0.0.1) in place."""
    placeholders: dict[str, str] = field(default_factory=dict)
    """Replacement per kind, e.g. { email = "[email]" }; defaults `<EMAIL>`, `<PHONE>`, `<IP>`, `<AADHAAR>`, `<PAN>`."""


@dataclass
class BlocklistConfig:
    """[curate.blocklist]: your word lists per language, matched whole-word (Indic-safe), case-insensitive."""

    files: dict[str, str] = field(default_factory=dict)
    """Language -> file with one word or phrase per line (# comments), e.g. { hi = "lists/hi.txt" };
    `"*"` applies to every language."""
    words: dict[str, list[str]] = field(default_factory=dict)
    """Language -> words, inline, added to those from `files`."""
    action: Literal["drop", "mask"] = "drop"
    """`drop` the document, or `mask` each match with `placeholder` and keep it."""
    min_hits: int = 1
    """Drop a document with at least this many matches (action = "drop")."""
    placeholder: str = "<BLOCKED>"
    """Replacement for a match when action = "mask"."""

    def validate(self) -> None:
        require(self.min_hits >= 1, "min_hits", f"must be >= 1, got {self.min_hits}")


@dataclass
class ExactDedupConfig:
    """[curate.exact_dedup]: keep one copy of each text (datatrove's exact dedup, three jobs)."""

    normalize: bool = True
    """Compare texts casefolded with whitespace collapsed, so "Hello  World" and "hello world" are copies."""


@dataclass
class NearDedupConfig:
    """[curate.near_dedup]: MinHash near-duplicate removal (datatrove's four MinHash jobs). Two texts
    whose word n-gram Jaccard similarity is s are caught with probability 1 - (1 - s^r)^b (r hashes per
    bucket, b buckets); the defaults catch s = 0.8 with 92% and s = 0.5 with 3%."""

    n_grams: int = 5
    """Words per shingle."""
    num_buckets: int = 14
    """LSH bands b; more catch lower similarities."""
    hashes_per_bucket: int = 8
    """Hashes per band r; more demand higher similarity."""
    seed: int = 1
    """Seed of the hash functions."""

    def validate(self) -> None:
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def threshold(self) -> float:
        """Similarity at which the catch probability passes 50% (approximately (1/b)^(1/r))."""
        return (1 / self.num_buckets) ** (1 / self.hashes_per_bucket)


@dataclass
class SlurmConfig:
    """[curate.slurm]: datatrove's Slurm executor (executor = "slurm"); each job is a Slurm array."""

    partition: str = ""
    """Partition to submit to (required with executor = "slurm")."""
    time: str = "04:00:00"
    """Time limit per task."""
    cpus_per_task: int = 1
    """CPUs per task."""
    mem_per_cpu_gb: int = 2
    """Memory per CPU in GB."""
    qos: str = "normal"
    """Quality of service."""
    env_command: str = ""
    """Shell command run before each task, e.g. `source ~/slmforge/.venv/bin/activate`."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Extra `#SBATCH` options, e.g. { account = "proj42" }."""
    max_array_size: int = 1001
    """Largest job array your cluster allows."""


@dataclass
class CurateConfig:
    """The `[curate]` section: raw text in, a clean corpus and a report out."""

    inputs: list[InputConfig] = field(default_factory=list)
    """Raw text, e.g. [{ path = "raw/hi/", lang = "hi" }]. JSONL, text or Parquet, plain or .gz/.zst."""
    out: str = "curated"
    """Output folder: data/<language>/*.jsonl.gz, removed/<stage>/, report.json, report.html."""
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages in order. Per-document: html (list it first), normalize, script, language, quality,
    gopher_quality, gopher_repetition, c4, fineweb, pii, blocklist; then optionally exact_dedup,
    near_dedup (last)."""
    workers: int = 0
    """Processes running tasks at once on this machine; 0 = all cores."""
    tasks: int = 0
    """Units of work (each reads a share of the input files); 0 = one per input file. A re-run skips
    finished tasks."""
    executor: Literal["local", "slurm"] = "local"
    """`local`: this machine. `slurm`: submit each job as a Slurm array ([curate.slurm])."""
    start_method: Literal["auto", "fork", "forkserver", "spawn"] = "auto"
    """How local worker processes start. `auto`: fork on Linux (measured 2x faster per job than
    datatrove's default forkserver, which re-imports everything per worker), forkserver elsewhere."""
    on_bad_file: Literal["skip", "fail"] = "skip"
    """An unreadable, corrupt or non-UTF-8 input file: `skip` it (named and counted in the report) or
    `fail` the run naming it."""
    datatrove_logs: bool = False
    """Also show datatrove's own log lines and per-task statistics (stderr, and .work/logs/<job>/logs/);
    off, only slmforge's progress lines are printed."""
    keep_removed: bool = True
    """Write every removed document to removed/<stage>/ (with its reason), not only the report's samples."""
    samples_per_reason: int = 3
    """Removed examples kept per stage and reason for the report."""
    html: HtmlConfig = field(default_factory=HtmlConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    script: ScriptConfig = field(default_factory=ScriptConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    gopher_quality: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    gopher_repetition: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    c4: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    fineweb: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        require(bool(self.inputs), "inputs", "required: at least one input (--input PATH)")
        require(bool(self.out), "out", "required: an output folder (--out DIR)")
        for i, name in enumerate(self.stages):
            require(name in STAGES, f"stages[{i}]", f"unknown stage {name!r}; known: {', '.join(STAGES)}")
        require(len(set(self.stages)) == len(self.stages), "stages", "a stage is listed twice")
        tail = [s for s in self.stages if s in DEDUP_STAGES]
        require(self.stages[len(self.stages) - len(tail):] == tail and tail == [s for s in DEDUP_STAGES if s in tail],
                "stages", "exact_dedup and near_dedup must come last, in that order")
        require(self.workers >= 0, "workers", f"must be >= 0 (0 = all cores), got {self.workers}")
        require(self.tasks >= 0, "tasks", f"must be >= 0 (0 = one per input file), got {self.tasks}")
        require(self.samples_per_reason >= 0, "samples_per_reason", f"must be >= 0, got {self.samples_per_reason}")
        require(self.executor != "slurm" or bool(self.slurm.partition), "slurm.partition",
                "required with executor = \"slurm\"")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> CurateConfig:
    """The `[curate]` section of a recipe, then `flags` (--input/--out), then `curate.*` overrides."""
    return config.load_section(CurateConfig, SECTION, path, overrides, flags)
