"""Throughput of `prepare_data` against a plain tokenize-and-save loop, measured in the same run.

    python benchmarks/bench_data_prepare.py            # ~24 MB synthetic Assamese/Hindi/English text
    python benchmarks/bench_data_prepare.py --mb 100 --vocab 16000

Baseline: one process reads the lines, calls the tokenizer backend's `encode_batch` on batches of
1024 (the tokenizers library parallelizes that across cores itself), appends eos and writes the ids
to a .npy file. `prepare_data` also mixes sources, splits train/val, writes shards, checkpoints and a
manifest. Both start from warm page cache (the files are read once before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from slmforge.data.encode import default_workers
from slmforge.data.prepare import load_config, prepare_data

# Syllables per script, to make word-like text whose token statistics resemble real text.
SYLLABLES = {
    "as": ["অ", "ক", "কা", "কি", "গ", "ঘৰ", "নদী", "মা", "নু", "হ", "ভা", "ষা", "ৰ", "ল", "স", "ত", "প"],
    "hi": ["क", "का", "कि", "भा", "र", "त", "ष", "ा", "न", "दी", "ल", "ग", "म", "स", "प", "है", "घर"],
    "en": ["th", "e", "ri", "ver", "tr", "ee", "peo", "ple", "lan", "gu", "age", "bo", "ok", "s", "in", "g"],
}


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    files = []
    for lang, syllables in SYLLABLES.items():
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
        path = folder / f"{lang}.txt"
        size, target = 0, megabytes * 1e6 / len(SYLLABLES)
        with open(path, "w", encoding="utf-8") as f:
            while size < target:
                line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + ".\n"
                f.write(line)
                size += len(line.encode())
        files.append(path)
    return files


def make_tokenizer(folder: Path, files: list[Path], vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sample = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()[:3000]]
    tok.train_from_iterator(sample, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return folder


def baseline(files: list[Path], tokenizer: Path, out: Path) -> tuple[float, int]:
    """Seconds and tokens for the plain loop: read lines, backend.encode_batch, write one .npy."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    eos = backend.token_to_id("<eos>")
    start = time.perf_counter()
    chunks = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            batch: list[str] = []
            for line in f:
                batch.append(line.rstrip("\n"))
                if len(batch) == 1024:
                    chunks.append(_encode(backend, batch, eos))
                    batch = []
            if batch:
                chunks.append(_encode(backend, batch, eos))
    tokens = np.concatenate(chunks)
    np.save(out, tokens)
    return time.perf_counter() - start, len(tokens)


def _encode(backend, batch: list[str], eos: int) -> np.ndarray:
    ids: list[int] = []
    for encoding in backend.encode_batch(batch, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.uint16)


def run_prepare(files: list[Path], tokenizer: Path, out: Path, workers: int) -> tuple[float, int]:
    cfg = load_config(flags={"sources": [{"path": str(f)} for f in files], "tokenizer": str(tokenizer),
                             "out": str(out), "workers": workers})
    start = time.perf_counter()
    prepare_data(cfg, show_progress=False)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return seconds, sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (workers): work done, whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender keeps its best")
    args = parser.parse_args()
    cores = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_corpus(root, args.mb)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        tokenizer = make_tokenizer(root / "tok", files, args.vocab)
        for f in files:
            f.read_bytes()  # warm the page cache for every contender alike
        print(f"corpus {megabytes:.1f} MB in {len(files)} files, vocab {args.vocab}, {cores} cores, "
              f"best of {args.repeats} interleaved rounds")

        def prepare_with(workers: int):
            def run() -> tuple[float, int]:
                out = root / f"prepare-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                return run_prepare(files, tokenizer, out, workers)
            return run

        contenders = {"baseline (encode_batch loop)": lambda: baseline(files, tokenizer, root / "base.npy")}
        for workers in sorted({1, cores}):
            contenders[f"prepare_data workers={workers}"] = prepare_with(workers)
        best: dict[str, tuple[float, float, int]] = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all alike
            for name, run in contenders.items():
                cpu = cpu_seconds()
                seconds, tokens = run()
                cpu = cpu_seconds() - cpu
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, cpu, tokens)
        base_seconds = best["baseline (encode_batch loop)"][0]
        for name, (seconds, cpu, tokens) in best.items():
            print(f"{name:30s} {megabytes / seconds:6.2f} MB/s  {seconds:6.2f} s wall  {cpu:6.2f} s cpu  "
                  f"{tokens:>12,} tokens  ratio {base_seconds / seconds:.2f}x")
        print("(prepare_data also writes one bos per document, shards, checkpoints and a manifest)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the baseline gets the library's threads
    main()
