"""Throughput of `data curate` (datatrove pipeline) with 1 and 2 workers against a plain single-process
Python loop running the same filters, measured in one run: interleaved rounds, wall and CPU time.

    python benchmarks/bench_curate.py                 # ~8,000 documents (~6 MB) in 4 JSONL files
    python benchmarks/bench_curate.py --docs 40000 --rounds 3

Both sides run the default stages (normalize, script, language, quality, pii, blocklist, exact_dedup,
near_dedup) with the same step objects: the baseline calls each stage's `filter()` in a loop, dedups
exactly with a set of the same keys and near-duplicates with datatrove's MinHash signatures (same
shingles and hashes) in an in-memory LSH table, and writes one JSONL.gz per language. `data curate`
adds what makes it scale and resumable: per-file tasks, datatrove's disk-based dedup jobs (signatures
sorted on disk, clusters, then a filter pass), accounting per stage and language, the removed/ files
and the report. Each measurement is a fresh subprocess; CPU time includes its worker processes.
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = {
    "hi": "भारत की राजधानी नई दिल्ली है और यह देश के उत्तर में स्थित एक बड़ा शहर है लोग काम करते हैं नदी "
          "पानी खेत गाँव किसान सरकार शिक्षा विद्यालय बच्चे पढ़ते हैं",
    "as": "অসমৰ ৰাজধানী দিছপুৰ আৰু এই ঠাইখন গুৱাহাটী চহৰৰ ভিতৰত অৱস্থিত হয় ব্ৰহ্মপুত্ৰ নৈৰ পাৰত মানুহে খেতি কৰে "
          "চাহ বাগিচা বিদ্যালয় ছাত্ৰ পঢ়ে",
    "bn": "বাংলাদেশের রাজধানী ঢাকা এবং এটি দেশের সবচেয়ে বড় শহর যেখানে অনেক মানুষ থাকে নদী পানি কৃষক সরকার শিক্ষা "
          "বিদ্যালয় ছাত্র পড়ে",
    "en": "the capital of india is new delhi and it is a large city in the north of country people work river "
          "water farm village government school children read",
    "de": "die hauptstadt von deutschland ist berlin und sie ist die größte stadt des landes menschen arbeiten "
          "fluss wasser bauernhof dorf regierung schule kinder lesen",
}
NOISE = ["Home | About | Contact | Login | Register", "★★★★★ BUY NOW ★★★★★ $$$ 50% OFF ###",
         "12 34 56 78 90 11 22 33 44 55 66 77 88 99 00"]
PII = [" संपर्क ramesh@example.co.in या +91 98765 43210।", " Aadhaar 2345 6789 0123, PAN ABCPE1234F.",
       " Server 203.0.113.9, call 011-23456789."]
STAGES = ["normalize", "script", "language", "quality", "pii", "blocklist", "exact_dedup", "near_dedup"]
BLOCK = {"hi": ["गंदी"], "en": ["darn"], "de": ["mist"]}


def write_corpus(folder: Path, docs: int, files: int = 4, seed: int = 0) -> list[Path]:
    """Paragraphs of 60-160 words per language, with 10% boilerplate, 10% exact copies, 10% lightly
    edited copies and PII in some documents."""
    rng = random.Random(seed)
    vocab = {lang: text.split() for lang, text in WORDS.items()}
    texts: list[str] = []
    for _ in range(docs):
        roll = rng.random()
        if roll < 0.1:
            texts.append(rng.choice(NOISE))
        elif roll < 0.2 and texts:
            texts.append(rng.choice(texts))
        elif roll < 0.3 and texts:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = "edit"
            texts.append(" ".join(words))
        else:
            lang = rng.choice(list(vocab))
            words = [rng.choice(vocab[lang]) for _ in range(rng.randint(60, 160))]
            texts.append(" ".join(words) + "." + (rng.choice(PII) if rng.random() < 0.2 else ""))
    paths = []
    for i in range(files):
        path = folder / f"part-{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[i::files]),
                        encoding="utf-8")
        paths.append(path)
    return paths


def curate_config(data: Path, out: Path, workers: int):
    from slmforge import config
    from slmforge.curate.config import CurateConfig

    return config.from_dict(CurateConfig, {
        "inputs": [{"path": str(data)}], "out": str(out), "workers": workers, "stages": STAGES,
        "blocklist": {"words": BLOCK}})


def run_curate(data: Path, out: Path, workers: int) -> int:
    import logging

    from slmforge.curate.pipeline import curate

    logging.disable(logging.CRITICAL)
    curate(curate_config(data, out, workers), show_progress=False)
    return json.loads((out / "curate.json").read_text())["documents"]


def run_baseline(data: Path, out: Path) -> int:
    """The same stages as a plain loop over the documents, in this one process."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    from slmforge.curate.pipeline import _dedup_key_folded
    from slmforge.curate.steps import (
        BlocklistFilter,
        LanguageTagger,
        Normalize,
        PiiRedactor,
        QualityFilter,
        ScriptTagger,
        UnicodeWords,
    )

    cfg = curate_config(data, out, 1)
    steps = [Normalize(cfg.normalize), ScriptTagger(cfg.script), LanguageTagger(cfg.language),
             QualityFilter(cfg.quality), PiiRedactor(cfg.pii), BlocklistFilter(cfg.blocklist)]
    near = cfg.near_dedup
    minhash = MinhashDedupSignature(str(out / "unused"), MinhashConfig(
        n_grams=near.n_grams, num_buckets=near.num_buckets, hashes_per_bucket=near.hashes_per_bucket, seed=near.seed,
        norm_config=TextNormConfig(norm_unicode_diacritics=False), hash_config=HashConfig(64, "sha1")),
        language=UnicodeWords())
    seen: set[bytes] = set()
    bands: list[set[tuple]] = [set() for _ in range(near.num_buckets)]
    out.mkdir(parents=True)
    writers: dict[str, gzip.GzipFile] = {}
    kept = 0
    for path in sorted(data.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                doc = Document(text=json.loads(line)["text"], id=f"{path.name}/{i}", metadata={"language": "und"})
                if not all(step.filter(doc) is True for step in steps):
                    continue
                key = _dedup_key_folded(doc).encode("utf-8")
                if key in seen:
                    continue
                seen.add(key)
                shingles = minhash.get_shingles(doc.text)
                if shingles.size:
                    signature = [tuple(b) for b in minhash.get_signature(shingles)]
                    if any(sig in band for sig, band in zip(signature, bands)):
                        continue
                    for sig, band in zip(signature, bands):
                        band.add(sig)
                lang = doc.metadata["language"]
                if lang not in writers:
                    (out / lang).mkdir()
                    writers[lang] = gzip.open(out / lang / "00000.jsonl.gz", "wb")
                writers[lang].write(json.dumps({"text": doc.text, "id": doc.id, "metadata": doc.metadata},
                                               ensure_ascii=False).encode("utf-8") + b"\n")
                kept += 1
    for w in writers.values():
        w.close()
    return kept


def measure(variant: str, data: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the subprocess and every process under it, documents kept)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--run", variant, "--data", str(data), "--out", str(out)],
                          check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    _reap_orphans()  # datatrove's forkserver outlives the subprocess; its CPU (and its workers') counts too
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, int(done.stdout.strip().splitlines()[-1])


def _become_subreaper() -> None:
    """Orphaned descendants (the forkserver) get reparented to us, so we can wait for them and their
    CPU time lands in our RUSAGE_CHILDREN. Linux only; elsewhere CPU time may miss worker processes."""
    try:
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap_orphans(timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", choices=["baseline", "curate-1", "curate-2"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        data, out = Path(args.data), Path(args.out)
        kept = run_baseline(data, out) if args.run == "baseline" else run_curate(data, out, int(args.run[-1]))
        print(kept)
        return
    _become_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "raw"
        data.mkdir()
        files = write_corpus(data, args.docs)
        size = sum(p.stat().st_size for p in files)
        print(f"corpus: {args.docs:,} documents, {size / 1e6:.1f} MB in {len(files)} JSONL files; "
              f"{os.cpu_count()} cores; best of {args.rounds} interleaved rounds")
        variants = ["baseline", "curate-1", "curate-2"]
        results: dict[str, list[tuple[float, float, int]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                results[v].append(measure(v, data, root / f"out-{v}-{r}"))
        base_wall = min(w for w, _, _ in results["baseline"])
        print(f"{'':<34}{'docs/s':>9}{'MB/s':>8}{'wall s':>9}{'CPU s':>8}{'kept':>7}{'vs loop':>9}")
        labels = {"baseline": "plain loop, 1 process", "curate-1": "data curate, workers = 1",
                  "curate-2": "data curate, workers = 2"}
        for v in variants:
            wall, cpu, kept = min(results[v])
            print(f"{labels[v]:<34}{args.docs / wall:>9,.0f}{size / 1e6 / wall:>8.2f}{wall:>9.2f}{cpu:>8.2f}"
                  f"{kept:>7,}{base_wall / wall:>8.2f}x")


if __name__ == "__main__":
    main()
