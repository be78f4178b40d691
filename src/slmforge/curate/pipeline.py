"""`data curate`: build the datatrove jobs for the configured stages, run them, then write the report.

    inputs --filter job: read, per-document stages--> docs/filter/<rank>.jsonl.gz
           --exact dedup: signatures, find (1 task), filter--> docs/exact/
           --near dedup: MinHash signatures, buckets, clusters (1 task), filter--> final/<lang>/
           --finalize--> out/data/<lang>/*.jsonl.gz, out/removed/<stage>/, report.json, report.html, curate.json

Each job is a datatrove executor with its own logging folder under out/.work/logs/: a task that
finished is marked there and skipped when the same command runs again. The clean corpus appears in
out/data/ only once every job is done (one rename), and curate.json, written last, marks the folder
complete: an interrupted run never leaves output that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slmforge.curate.config import DEDUP_STAGES, CurateConfig
from slmforge.errors import SlmforgeError
from slmforge.fileio import write_json_atomic

WORK = ".work"
MANIFEST = "curate.json"
FORMAT = "slmforge-curate/1"


def require_datatrove() -> None:
    """One line naming the extra when datatrove (or a package the stages need) is missing."""
    missing = []
    for module in ("datatrove", "ftfy", "py3langid", "regex", "orjson"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SlmforgeError(f"data curate needs {', '.join(missing)}: pip install 'slmforge[curate]'")


@dataclass
class Job:
    name: str
    pipeline: list[Any]
    tasks: int


def input_files(cfg: CurateConfig) -> list[tuple[str, Any]]:
    """Every input file with its input's settings, in a fixed order (inputs as listed, files sorted)."""
    from slmforge.text.sources import SourceConfig, resolve_files

    files = []
    for source in cfg.inputs:
        for path in resolve_files(SourceConfig(path=source.path)):
            files.append((str(path.resolve()), source))
    return files


def identity(cfg: CurateConfig, files: list[tuple[str, Any]]) -> dict[str, Any]:
    """What determines the output: the config (not workers, executor, slurm) and the input files."""
    recorded = dataclasses.asdict(cfg)  # (config.to_dict leaves dataclasses inside dict fields as they are)
    for key in ("workers", "executor", "start_method", "slurm", "out", "datatrove_logs"):
        recorded.pop(key, None)
    listing = []
    for path, _ in files:
        stat = os.stat(path)
        listing.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"config": recorded, "files": listing}


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- building the jobs


def as_record(writer: Any, doc: Any) -> dict[str, Any]:
    """A document as the JSON line written: datatrove's default adapter deep-copies it (asdict) first."""
    return {"text": doc.text, "id": doc.id, "metadata": doc.metadata}


def _tracked(cfg: CurateConfig, name: str, inner: Any, work: Path, **kwargs: Any) -> Any:
    from datatrove.pipeline.writers import JsonlWriter

    from slmforge.curate.steps import Tracked

    writer = (JsonlWriter(str(work / "removed" / name), output_filename="${rank}.jsonl.gz", adapter=as_record)
              if cfg.keep_removed else None)
    return Tracked(name, inner, removed_writer=writer, samples=cfg.samples_per_reason, **kwargs)


def stage_step(cfg: CurateConfig, name: str, work: Path) -> Any:
    """The per-document stage `name`, wrapped for accounting."""
    from slmforge.curate import steps

    if name == "html":
        return _tracked(cfg, name, steps.HtmlText(cfg.html), work)
    if name == "normalize":
        return _tracked(cfg, name, steps.Normalize(cfg.normalize), work)
    if name == "script":
        return _tracked(cfg, name, steps.ScriptTagger(cfg.script), work)
    if name == "language":
        tagger = steps.LanguageTagger(cfg.language)
        tagger.model.check()  # a missing model is one line now, not a traceback in a worker
        tagger.model = steps.LanguageModel(cfg.language)  # workers load their own
        return _tracked(cfg, name, tagger, work)
    if name == "quality":
        return _tracked(cfg, name, steps.QualityFilter(cfg.quality), work)
    if name == "pii":
        return _tracked(cfg, name, steps.PiiRedactor(cfg.pii), work)
    if name == "blocklist":
        return _tracked(cfg, name, steps.BlocklistFilter(cfg.blocklist), work)
    # datatrove's own filters, with a word tokenizer that handles every script
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    classes = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
               "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
    section = getattr(cfg, name)
    try:
        inner = classes[name](language=steps.UnicodeWords(), **section.options)
    except TypeError as e:
        raise SlmforgeError(f"curate.{name}.options: {e}") from None
    return _tracked(cfg, name, inner, work, languages=section.languages)


def _dedup_key_exact(doc: Any) -> str:
    return doc.text


def _dedup_key_folded(doc: Any) -> str:
    return " ".join(doc.text.casefold().split())


# datatrove's default xxhash path passes str to xxhash, which xxhash >= 4 refuses; SHA-1 takes str.
def _hash_config() -> Any:
    from datatrove.utils.hashing import HashConfig

    return HashConfig(precision=64, hash_fc="sha1")


def _priority(doc: Any) -> int:
    """Among copies, keep the one whose raw text hashes highest: the same copy for any input order."""
    return 1 + zlib.crc32(doc.text.encode("utf-8", "surrogatepass")) % 65535


def build_jobs(cfg: CurateConfig, files: list[tuple[str, Any]], work: Path, tasks: int,
               show_progress: bool = True) -> list[Job]:
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from slmforge.curate.steps import CurateReader, EnsureShard, TaskProgress

    doc_stages = [s for s in cfg.stages if s not in DEDUP_STAGES]
    dedup = [s for s in cfg.stages if s in DEDUP_STAGES]
    final = str(work / "final")

    def writer(last: bool, folder: str) -> list[Any]:
        if last:  # the clean corpus, one folder per language
            return [JsonlWriter(final, output_filename="${language}/${rank}.jsonl.gz", adapter=as_record)]
        # between jobs: plain JSONL (gzip costs more CPU than the disk it saves for a file read back at once)
        return [JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None, adapter=as_record),
                EnsureShard(folder)]

    def reader(folder: str) -> Any:
        return JsonlReader(folder, compression=None, glob_pattern="*.jsonl")

    reader_step = CurateReader(files, cfg.on_bad_file, cfg.samples_per_reason)
    previous = str(work / "docs" / "filter")
    jobs = [Job("filter", [reader_step, *(stage_step(cfg, s, work) for s in doc_stages),
                           TaskProgress(reader_step, enabled=show_progress), *writer(not dedup, previous)],
                tasks)]
    if "exact_dedup" in dedup:
        from datatrove.pipeline.dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
        from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig

        exact = ExactDedupConfig(content_getter=_dedup_key_folded if cfg.exact_dedup.normalize else _dedup_key_exact,
                                 document_priority=_priority, hash_config=_hash_config())
        sigs, dups, out = work / "exact" / "sigs", work / "exact" / "dups", str(work / "docs" / "exact")
        jobs += [
            Job("exact-signatures", [reader(previous), ExactDedupSignature(str(sigs), exact)], tasks),
            Job("exact-find", [ExactFindDedups(str(sigs), str(dups), exact)], 1),
            Job("exact-filter", [reader(previous),
                                 _tracked(cfg, "exact_dedup", ExactDedupFilter(str(dups), exact), work,
                                          default_reason="exact_duplicate"),
                                 *writer(dedup[-1] == "exact_dedup", out)], tasks),
        ]
        previous = out
    if "near_dedup" in dedup:
        from datatrove.pipeline.dedup import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.utils.text import TextNormConfig

        from slmforge.curate.steps import UnicodeWords

        near = cfg.near_dedup
        # Keep Indic vowel signs: "diacritics" normalization would strip them and merge distinct words.
        minhash = MinhashConfig(n_grams=near.n_grams, num_buckets=near.num_buckets,
                                hashes_per_bucket=near.hashes_per_bucket, seed=near.seed,
                                norm_config=TextNormConfig(norm_unicode_diacritics=False),
                                hash_config=_hash_config())
        sigs, buckets, remove = (work / "minhash" / p for p in ("sigs", "buckets", "remove"))
        jobs += [
            Job("minhash-signatures", [reader(previous),
                                       MinhashDedupSignature(str(sigs), minhash, language=UnicodeWords())], tasks),
            Job("minhash-buckets", [MinhashDedupBuckets(str(sigs), str(buckets), config=minhash)], near.num_buckets),
            Job("minhash-clusters", [MinhashDedupCluster(str(buckets), str(remove), config=minhash)], 1),
            Job("minhash-filter", [reader(previous),
                                   _tracked(cfg, "near_dedup", MinhashDedupFilter(str(remove)), work,
                                            default_reason="near_duplicate"),
                                   *writer(True, "")], tasks),
        ]
    return jobs


# ---------------------------------------------------------------- running


def _open_out(out: Path, work: Path, ident: dict[str, Any]) -> bool:
    """True when `out` already holds this exact curation (nothing to do). Refuses, in one line, a
    folder curated or half-curated with other settings or inputs, and a non-empty foreign folder."""
    key = fingerprint(ident)
    manifest = out / MANIFEST
    if manifest.is_file():
        if json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == key:
            return True
        raise SlmforgeError(f"{out}: already holds a curated corpus made with other settings or inputs; "
                            "choose another out folder or delete this one")
    run_file = work / "run.json"
    if run_file.is_file():
        if json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint") != key:
            raise SlmforgeError(f"{out}: holds an interrupted curation with other settings or changed input "
                                "files; rerun it unchanged to resume, or delete the folder to start over")
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlmforgeError(f"{out}: exists and is not empty; choose another out folder")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, {"fingerprint": key, **ident})
    return False


def _executor(cfg: CurateConfig, job: Job, work: Path, depends: Any = None) -> Any:
    logs = str(work / "logs" / job.name)
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = cfg.slurm
        return SlurmPipelineExecutor(
            job.pipeline, tasks=job.tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, env_command=s.env_command or None,
            sbatch_args=dict(s.sbatch_args) or None, max_array_size=s.max_array_size,
            job_name=f"curate-{job.name}", logging_dir=logs, depends=depends)
    from datatrove.executor import LocalPipelineExecutor

    workers = min(cfg.workers or os.cpu_count() or 1, job.tasks)
    method = cfg.start_method if cfg.start_method != "auto" else "fork" if sys.platform == "linux" else "forkserver"
    return LocalPipelineExecutor(job.pipeline, tasks=job.tasks, workers=workers, logging_dir=logs,
                                 start_method=method)


class Finalize:
    """The last Slurm job (one task): the same finalization the local executor runs in-process."""

    def __init__(self, cfg: CurateConfig, jobs: dict[str, int], started: float):
        self.cfg, self.jobs, self.started = cfg, jobs, started

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        check_read(self.cfg, Path(self.cfg.out) / WORK)  # in this job's log: the Slurm job fails on it
        finalize(self.cfg, self.jobs, self.started)


SHOWN_BAD_FILES = 5  # skipped input files named on the console (report.json has up to 20 per task)


def check_read(cfg: CurateConfig, work: Path) -> None:
    """After the reading ("filter") job: name the input files skipped as unreadable on the console, and
    stop with one line when every input file was (nothing was read: there is nothing to curate)."""
    from slmforge.curate.report import read_summary
    from slmforge.formatting import say

    read = read_summary([work / "logs" / "filter"])
    count, bad = read["bad_file_count"], read["bad_files"]
    if not count:
        return
    if count >= read["files"] and not read["documents"]:
        shown = ", ".join(f"{b['file']} ({b['error']})" for b in bad[:3])
        more = f" and {count - 3} more" if count > 3 else ""
        raise SlmforgeError(f"none of the {count} input file{'s' * (count > 1)} could be read, so there is "
                            f"nothing to curate: {shown}{more}")
    lines = [f"warning: curate skipped {count} of {read['files']} input files as unreadable "
             f"(see report.json):"]
    shown_bad = bad[:SHOWN_BAD_FILES]
    lines += [f"  {b['file']}: {b['error']}" for b in shown_bad]
    if count > len(shown_bad):
        lines.append(f"  ... and {count - len(shown_bad)} more")
    say("\n".join(lines))  # one message: a warning, so said in quiet mode too


def curate(cfg: CurateConfig, show_progress: bool = True) -> Path:
    """Run `data curate` with `cfg` and return the output folder (see the module docstring)."""
    require_datatrove()
    from loguru import logger

    if cfg.datatrove_logs:
        return _curate(cfg, show_progress)
    logger.disable("datatrove")  # its per-task banners and stats would bury our progress lines
    try:
        with no_progress_bars():  # and so would the tqdm bars of its dedup steps
            return _curate(cfg, show_progress)
    finally:
        logger.enable("datatrove")


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Turn tqdm's bars off (datatrove's dedup steps draw them on stderr) until the block ends.

    tqdm reads TQDM_DISABLE only when it is imported, and datatrove imported it long before: setting the
    variable now reaches only workers that start a fresh interpreter (spawn, forkserver). So tqdm's
    default for `disable` becomes True for this process and the workers it forks; a step that passes
    `disable` itself (a datatrove reader's doc_progress, off by default) still decides."""
    from tqdm import std

    saved_init = std.tqdm.__dict__["__init__"]
    saved_env = os.environ.get("TQDM_DISABLE")
    std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        std.tqdm.__init__ = saved_init
        if saved_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_env


def _curate(cfg: CurateConfig, show_progress: bool) -> Path:
    started = time.time()
    if cfg.executor == "slurm":  # tasks run on other nodes, maybe from another working directory
        cfg = dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()))
    out = Path(cfg.out)
    work = out / WORK
    files = input_files(cfg)
    ident = identity(cfg, files)
    if _open_out(out, work, ident):
        _say(show_progress, f"{out} is already curated with these settings and inputs; nothing to do")
        return out
    tasks = cfg.tasks or max(1, len(files))
    jobs = build_jobs(cfg, files, work, tasks, show_progress)
    names = {job.name: job.tasks for job in jobs}
    if cfg.executor == "slurm":
        previous = None
        for job in jobs:
            previous = _executor(cfg, job, work, depends=previous)
        final = _executor(cfg, Job("finalize", [Finalize(cfg, names, started)], 1), work, depends=previous)
        final.run()
        _say(show_progress, f"submitted {len(jobs) + 1} Slurm jobs; logs in {work / 'logs'}; the report "
                            f"and {out / 'data'} appear when the last one ends")
        return out
    for job in jobs:
        t0 = time.time()
        _executor(cfg, job, work).run()
        _say(show_progress, f"job {job.name} done ({job.tasks} task{'s' * (job.tasks > 1)}) in {time.time() - t0:.1f}s")
        if job.name == "filter":
            try:
                check_read(cfg, work)
            except SlmforgeError:
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume: a fixed rerun starts afresh
                raise
    report = finalize(cfg, names, started)
    from slmforge.curate.report import size

    total = report["output"]
    _say(show_progress, f"{report['input']['documents']:,} -> {total['documents']:,} documents "
                        f"({total['kept_documents_pct']:.1f}% kept), {size(report['input']['bytes'])} -> "
                        f"{size(total['bytes'])} in {report['timing']['seconds']:.1f}s "
                        f"({report['timing']['docs_per_s']:,.0f} docs/s, {report['timing']['mb_per_s']:.2f} MB/s); "
                        f"report: {out / 'report.html'}")
    return out


def _say(enabled: bool, message: str) -> None:
    if enabled:
        from slmforge.formatting import say

        say(f"curate: {message}")


def finalize(cfg: CurateConfig, jobs: dict[str, int], started: float) -> dict[str, Any]:
    """Check every job finished, move the corpus and removed documents into place, write the report,
    then curate.json (last: it marks the folder complete). Safe to run again after a crash midway."""
    from slmforge.curate.report import build_report, write_html

    out = Path(cfg.out)
    work = out / WORK
    for name, tasks in jobs.items():
        logs = work / "logs" / name
        done = len(list((logs / "completions").glob("*"))) if (logs / "completions").is_dir() else 0
        if done < tasks:
            raise SlmforgeError(f"{out}: job {name} has not finished ({done} of {tasks} tasks done); run the "
                                "same command again to resume")
    run = json.loads((work / "run.json").read_text(encoding="utf-8"))
    report = build_report(cfg, [work / "logs" / n for n in jobs], started)
    for src, dst in ((work / "final", out / "data"), (work / "removed", out / "removed")):
        if src.exists() and not dst.exists():
            os.replace(src, dst)
    (out / "data").mkdir(exist_ok=True)
    write_json_atomic(out / "report.json", report)
    write_html(report, out / "report.html")
    for scratch in ("docs", "exact", "minhash"):
        shutil.rmtree(work / scratch, ignore_errors=True)
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT, "fingerprint": run["fingerprint"], "config": run["config"],
        "data": "data", "languages": sorted(p.name for p in (out / "data").iterdir() if p.is_dir()),
        "documents": report["output"]["documents"], "bytes": report["output"]["bytes"],
    })
    return report
