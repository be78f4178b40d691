"""What a run folder says about itself, read from its files only (no model is loaded).

    config.toml, config_history.jsonl   the resolved config; each start and the step it resumed from
    metrics.jsonl                       train records (loss, lr, grad_norm, tokens/s, ...), val records,
                                        skipped non-finite steps
    checkpoints/step-N/meta.json        model config, tokens seen, versions, hardware (when recorded)
    checkpoints/step-N/eval.json        per-set evaluation (`slmforge eval`, the quickstart)
    tokenizer/                          kind, vocabulary, special tokens; report.json if one was made
    samples.txt / samples.jsonl         sample generations
    events.jsonl                        warnings kept by training (a tracker that stopped, ...)

A run of any objective or family has some of these; what is missing is None or empty, and the
renderers leave it out.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from slmforge.checkpoint.meta import META, CheckpointMeta
from slmforge.config import read_toml
from slmforge.errors import SlmforgeError

# Numbers an eval.json entry or a val record may hold, in the order tables show them.
EVAL_METRICS = [
    ("loss", "loss"),
    ("ppl", "perplexity"),
    ("bpb", "bits per byte"),
    ("accuracy", "accuracy"),
    ("exact_match", "exact match"),
    ("bleu", "BLEU"),
    ("chrf", "chrF"),
]


@dataclass
class RunFacts:
    """Everything the report shows about one run; fields a run lacks stay empty."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # config_history.jsonl entries
    train: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl train records
    val: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl val records
    skipped: list[dict[str, Any]] = field(default_factory=list)  # non-finite steps (update skipped)
    info: CheckpointMeta = field(default_factory=CheckpointMeta)  # newest checkpoint's meta.json
    meta_problems: list[str] = field(default_factory=list)  # meta.json files that could not be read
    step_dir: Path | None = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # set name -> metrics
    eval_step_dir: Path | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)
    tokenizer_report: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the data manifest's splits, if reachable
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_total: int = 0  # samples in the file, of which `samples` holds the first MAX_SAMPLES
    samples_file: str = ""  # samples.jsonl or samples.txt
    checkpoint_processes: dict[int, int] = field(default_factory=dict)  # step -> processes, every step folder
    events: list[dict[str, Any]] = field(default_factory=list)
    parameters: int | None = None

    def has(self, key: str, split: str = "train") -> bool:
        """Whether any record of `split` holds a number under `key`."""
        return any(_number(r.get(key)) is not None for r in (self.train if split == "train" else self.val))

    def series(self, key: str, split: str = "train") -> list[tuple[int, float]]:
        """(step, value) of every record of `split` with a finite number under `key`."""
        records = self.train if split == "train" else self.val
        return [(r["step"], v) for r in records if (v := _number(r.get(key))) is not None]

    def summary(self) -> dict[str, str]:
        """Label -> shown value, only for what the run recorded (order is the table's)."""
        out: dict[str, str] = {}
        model = self.info.model or self.config.get("model") or {}
        if model.get("family"):
            out["model"] = str(model["family"]) + (f" ({model['preset']})" if model.get("preset") else "")
        if self.parameters:
            out["parameters"] = f"{self.parameters / 1e6:,.2f}M"
        objective = self.info.objective_kind or (self.config.get("objective") or {}).get("kind")
        if objective:
            out["objective"] = str(objective)
        train_cfg = self.config.get("train") or {}
        step = self.info.step
        last_step = max([r["step"] for r in self.train + self.val], default=step)
        if last_step is not None:
            out["steps"] = f"{last_step:,}" + (f" / {train_cfg['max_steps']:,}" if train_cfg.get("max_steps") else "")
        tokens = self.tokens_seen()
        if tokens:
            out["tokens seen"] = f"{tokens:,}"
        if self.train and (loss := self.series("loss")):
            out["final train loss"] = f"{loss[-1][1]:.4f}"
        if val := self.series("loss", "val"):
            best = min(val, key=lambda p: p[1])
            out["best validation loss"] = f"{best[1]:.4f} (step {best[0]:,})"
        if rates := [v for _, v in self.series("tokens_per_s")]:
            out["tokens/s (median)"] = f"{statistics.median(rates):,.0f}"
        if mfu := [v for _, v in self.series("mfu")]:
            out["MFU (median)"] = f"{100 * statistics.median(mfu):.1f}%"
        wall = self.wall_time()
        if wall is not None:
            out["wall time"] = wall
        for label, value in self.environment().items():
            out[label] = value
        processes = self.processes_shown(last_step)
        if processes:
            out["processes"] = processes
        if train_cfg.get("seq_len") and train_cfg.get("batch_size"):
            accum = train_cfg.get("grad_accum", 1)
            processes = self.info.processes or 1
            out["batch"] = (f"{train_cfg['batch_size'] * accum * processes} x {train_cfg['seq_len']} tokens"
                            + (f" ({processes} processes)" if processes > 1 else ""))
        return out

    def process_segments(self, last_step: int | None = None) -> list[tuple[int, int | None, int | None]]:
        """(first step, last step, processes) of each part of the run that one start trained, merged
        where neighbours used the same number; processes None where nothing recorded it.

        A start is a config_history.jsonl entry (from the step it resumed from). Its processes are, in
        this order: the entry's own `processes` (if training recorded it), the meta.json of a step folder
        it saved, or the trainer's kept warning "resuming N-process state on M processes" (M from that
        step on, N before it). Without a history, the newest checkpoint's meta.json says it for all."""
        newest = self.info.processes
        end = last_step if last_step is not None else self.info.step
        starts = [_int_or_none(h.get("resumed_from_step")) for h in self.history]
        if not starts or None in starts:
            return [(0, end, newest)] if newest else []
        resumes: dict[int, tuple[int, int]] = {}
        for event in self.events:
            found = _RESUMED_ON.search(str(event.get("warning") or event.get("message") or ""))
            if found and _int_or_none(event.get("step")) is not None:
                resumes[event["step"]] = (int(found.group(1)), int(found.group(2)))
        timeline: list[tuple[int, int | None]] = []  # (first step, processes), later starts cutting earlier ones
        for k, (entry, start) in enumerate(zip(self.history, starts)):
            stop = starts[k + 1] if k + 1 < len(starts) else end
            count = _int_or_none(entry.get("processes"))
            if count is None:  # a step folder this start saved
                saved = [n for step, n in self.checkpoint_processes.items()
                         if start < step and (stop is None or step <= stop)]
                count = saved[-1] if saved else None
            if count is None and start in resumes:
                count = resumes[start][1]
            if count is None and k + 1 < len(starts) and stop in resumes:
                count = resumes[stop][0]
            if count is None and k + 1 == len(starts):
                count = newest
            timeline = [(a, c) for a, c in timeline if a < start] + [(start, count)]
        segments: list[tuple[int, int | None, int | None]] = []
        for k, (start, count) in enumerate(timeline):
            stop = timeline[k + 1][0] if k + 1 < len(timeline) else end
            if segments and segments[-1][2] == count:
                segments[-1] = (segments[-1][0], stop, count)
            else:
                segments.append((start, stop, count))
        return segments if any(c for *_, c in segments) else []

    def processes_shown(self, last_step: int | None = None) -> str:
        """"2" for a run that always used 2; "2 (steps 0-500), 1 (steps 500-600)" for one that changed."""
        segments = self.process_segments(last_step)
        if not segments:
            return ""
        if len(segments) == 1:
            return str(segments[0][2])

        def steps(start: int, stop: int | None) -> str:
            return f"steps {start:,}-{stop:,}" if stop is not None else f"from step {start:,}"

        return ", ".join(f"{count if count else '?'} ({steps(start, stop)})" for start, stop, count in segments)

    def tokens_seen(self) -> int | None:
        seen = [r["tokens"] for r in self.train if isinstance(r.get("tokens"), int)]
        return self.info.tokens_seen or (seen[-1] if seen else None)

    def wall_time(self) -> str | None:
        """The run's wall time: recorded by training if it was, else the time from its first start to
        its newest checkpoint (file times; pauses between resumes included, and said so)."""
        from slmforge.formatting import duration

        recorded = self.info.training_seconds
        if recorded is not None:
            return duration(recorded)
        if not self.history or self.step_dir is None:
            return None
        try:
            start = datetime.strptime(self.history[0]["started"], "%Y-%m-%d %H:%M:%S").timestamp()
            end = (self.step_dir / META).stat().st_mtime
        except (KeyError, ValueError, OSError):
            return None
        if end < start:
            return None
        resumes = len(self.history) - 1
        return duration(end - start) + (f" (first start to last checkpoint, {resumes} resume(s) included)"
                                        if resumes else "")

    def environment(self) -> dict[str, str]:
        """Hardware and versions, as far as meta.json records them."""
        out = {}
        info = self.info
        if info.hardware:
            out["hardware"] = ", ".join(f"{k} {v}" for k, v in info.hardware.items()
                                        if v not in (None, "") and k != "processes")  # a row of its own
        device = info.device or (self.config.get("train") or {}).get("device")
        if device and device != "auto":
            out["device"] = str(device)
        if info.versions:
            out["versions"] = ", ".join(f"{k} {v}" for k, v in info.versions.items())
        elif info.slmforge_version:
            out["versions"] = f"slmforge {info.slmforge_version}"
        return out

    def warnings(self) -> list[str]:
        """What went wrong or changed along the way: skipped steps, resumes, config changes, events."""
        out = list(self.meta_problems)
        if self.skipped:
            steps = [r["step"] for r in self.skipped]
            shown = ", ".join(str(s) for s in steps[:20]) + (", ..." if len(steps) > 20 else "")
            reasons = sorted({str(r.get("skipped")) for r in self.skipped})
            out.append(f"{len(steps)} update(s) skipped ({'; '.join(reasons)}) at step {shown}")
        for previous, entry in zip(self.history, self.history[1:]):
            line = f"resumed from step {entry.get('resumed_from_step', '?')} at {entry.get('started', '?')}"
            changed = _diff(flatten(previous.get("config") or {}), flatten(entry.get("config") or {}))
            if changed:
                line += "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            out.append(line)
        for event in self.events:
            where = f"step {event['step']}: " if event.get("step") is not None else ""
            out.append(f"{where}{event.get('warning') or event.get('message') or event}")
        return out


def find_run_dir(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder or one of its step folders -> the run folder. Any other
    folder inside a run (its data/, tokenizer/, plots/) is refused, not taken for the run."""
    path = Path(path)
    if not path.is_dir():
        raise SlmforgeError(f"{path}: no such run folder")
    candidates = [path]
    if path.name == "checkpoints":
        candidates.append(path.parent)
    if path.parent.name == "checkpoints":  # a step folder
        candidates.append(path.parent.parent)
    for candidate in candidates:
        if _is_run(candidate):
            return candidate
    outer = next((folder for folder in (path.parent, path.parent.parent) if folder != path and _is_run(folder)), None)
    inside = f"; it lies inside the run folder {outer}" if outer is not None else ""
    raise SlmforgeError(f"{path}: not a run folder (no metrics.jsonl, config.toml or checkpoints/) nor a "
                        f"checkpoint folder of one{inside}")


def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("metrics.jsonl", "config.toml", "checkpoints"))


def collect(path: str | Path, name: str | None = None) -> RunFacts:
    """Read what a run folder holds. `path` may also be a step folder: its eval.json is then shown."""
    from slmforge.checkpoint.reading import step_folders

    given = Path(path)
    run_dir = find_run_dir(given)
    facts = RunFacts(name=name or run_dir.name, path=run_dir)
    if (run_dir / "config.toml").is_file():
        facts.config = read_toml(run_dir / "config.toml")
    facts.history = _jsonl(run_dir / "config_history.jsonl")
    for record in _jsonl(run_dir / "metrics.jsonl"):
        if "skipped" in record:
            facts.skipped.append(record)
        elif record.get("split") == "val":
            facts.val.append(record)
        elif record.get("split", "train") == "train" and "step" in record:
            facts.train.append(record)
    steps = [p for p in step_folders(run_dir) if (p / META).is_file()]
    chosen = given if (given / META).is_file() else (steps[0] if steps else None)
    if chosen is not None:
        facts.step_dir = chosen
        facts.info = _meta(chosen, facts.meta_problems)
    for folder in steps:
        info = facts.info if folder == chosen else _meta(folder, facts.meta_problems)
        if info.process_count is not None and info.step is not None:
            facts.checkpoint_processes[info.step] = info.process_count
    facts.checkpoint_processes = dict(sorted(facts.checkpoint_processes.items()))
    with_eval = [given] if (given / "eval.json").is_file() else [p for p in steps if (p / "eval.json").is_file()]
    if with_eval:
        facts.eval_step_dir = with_eval[0]
        evals = _json(with_eval[0] / "eval.json")
        facts.evals = {k: v for k, v in (evals or {}).items() if isinstance(v, dict)}
    facts.tokenizer, facts.tokenizer_report = _tokenizer(run_dir)
    facts.data = _data(run_dir, facts.info)
    facts.samples, facts.samples_total, facts.samples_file = _samples(run_dir)
    facts.events = _jsonl(run_dir / "events.jsonl")
    facts.parameters = _parameters(facts.info.model or facts.config.get("model"))
    return facts


def collect_all(paths: list[str | Path]) -> list[RunFacts]:
    """Several runs; runs whose folders share a name are told apart by their parent folders."""
    dirs = [find_run_dir(p) for p in paths]
    names = [d.name for d in dirs]
    for depth in range(1, 4):
        if len(set(names)) == len(names):
            break
        names = [str(Path(*d.parts[-depth - 1:])) if names.count(n) > 1 else n for d, n in zip(dirs, names)]
    if len(set(names)) != len(names):  # the same folder twice
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return [collect(p, n) for p, n in zip(paths, names)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seq_len": 256}} -> {"train.seq_len": 256}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def config_diff(runs: list[RunFacts]) -> dict[str, list[Any]]:
    """Config fields whose values differ between runs: field -> one value per run (None: absent)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def eval_columns(runs: list[RunFacts]) -> list[tuple[str, str]]:
    """The eval metrics any run has, in table order."""
    return [(key, label) for key, label in EVAL_METRICS
            if any(_number(row.get(key)) is not None for r in runs for row in r.evals.values())]


# ------------------------------------------------------------------------------------------ helpers


# The trainer's kept warning when a run resumes on another number of processes (train/trainer.py).
_RESUMED_ON = re.compile(r"resuming (\d+)-process state on (\d+) processes")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _meta(step_dir: Path, problems: list[str]) -> CheckpointMeta:
    """A step folder's meta.json; one that cannot be read is shown as a warning and taken as empty
    (a report shows what it can)."""
    try:
        return CheckpointMeta.read(step_dir)
    except SlmforgeError as e:
        problems.append(str(e))
        return CheckpointMeta()


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; a torn or foreign line is skipped."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _tokenizer(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    folder = run_dir / "tokenizer"
    info = _json(folder / "slmforge_tokenizer.json") or {}
    facts: dict[str, Any] = {}
    if info:
        facts = {k: info[k] for k in ("kind", "vocab_size", "tokenizer_sha256") if k in info}
        if isinstance(info.get("special_tokens"), dict):
            facts["special_tokens"] = {k: v for k, v in info["special_tokens"].items() if v not in (None, "", [], {})}
        sample = info.get("sample")
        if isinstance(sample, dict):
            facts["sample"] = {k: v for k, v in sample.items() if isinstance(v, (int, float, str))}
    elif (folder / "tokenizer.json").is_file():
        backend = _json(folder / "tokenizer.json") or {}
        vocab = (backend.get("model") or {}).get("vocab")
        facts = {"kind": (backend.get("model") or {}).get("type", "?")}
        if isinstance(vocab, (dict, list)):
            facts["vocab_size"] = len(vocab)
    # A `slmforge tokenizer report --out DIR` kept with the run (tokenizer/report/ or tokenizer_report/).
    report = None
    kept = (folder / "report.json", folder / "report" / "report.json", run_dir / "tokenizer_report" / "report.json")
    for candidate in kept:
        if candidate.is_file():
            report = _json(candidate)
            break
    return facts, report if isinstance(report, dict) else None


def _data(run_dir: Path, info: CheckpointMeta) -> dict[str, Any]:
    """Tokens, documents and bytes per split from the data manifest, if the data is where meta says."""
    recorded = info.data
    if not recorded:
        return {}
    folder = Path(recorded) if Path(recorded).is_absolute() else run_dir / recorded
    manifest = _json(folder / "manifest.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return {}
    splits = {}
    for split, info in manifest["splits"].items():
        if isinstance(info, dict):
            splits[split] = {k: info[k] for k in ("tokens", "documents", "bytes") if isinstance(info.get(k), int)}
    return {"folder": os.path.relpath(folder, run_dir), "splits": splits}


MAX_SAMPLES = 50  # samples kept in RunFacts (the report shows fewer: render.SHOWN_SAMPLES)


def _samples(run_dir: Path) -> tuple[list[dict[str, Any]], int, str]:
    """(the first MAX_SAMPLES sample generations, how many the file holds, its name): samples.jsonl
    (`generate --json`'s {prompt, completion}, or fine-tuning's {prompt, reference, output, exact}) or
    samples.txt (one per line, as the quickstart writes them). Each as {"text"} or
    {"prompt", "output", "reference"?, "exact"?}."""
    samples = []
    for record in _jsonl(run_dir / "samples.jsonl"):
        output = record.get("output", record.get("completion"))
        if isinstance(output, str):
            samples.append({"prompt": str(record.get("prompt", "")), "output": output,
                            **{k: record[k] for k in ("reference", "exact") if k in record}})
    source = "samples.jsonl"
    if not samples and (run_dir / "samples.txt").is_file():
        text = (run_dir / "samples.txt").read_text(encoding="utf-8", errors="replace")
        samples = [{"text": line} for line in text.splitlines() if line.strip()]
        source = "samples.txt"
    return samples[:MAX_SAMPLES], len(samples), source if samples else ""


def _parameters(model: Any) -> int | None:
    """Parameters of the recorded model config, counted on the meta device (no memory, no weights)."""
    if not isinstance(model, dict):
        return None
    try:
        import torch

        from slmforge.models.registry import config_from_dict, family

        cfg = config_from_dict(model, "model")
        with torch.device("meta"):
            module = family(cfg).module_cls(cfg)
        return sum(p.numel() for p in module.parameters())
    except Exception:  # noqa: BLE001 - a config this version cannot build: the count is left out
        return None
