"""`data prepare` throughput against a plain loop: read lines, the tokenizers library's `encode_batch`
(which uses every core itself), append eos, save one .npy. `prepare_data` also mixes sources, splits
train/validation, writes shards, checkpoints and a manifest. Synthetic Assamese/Hindi/English text."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Row
from benchmarks.shapes import ShapeSet

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
        path, size, target = folder / f"{lang}.txt", 0, megabytes * 1e6 / len(SYLLABLES)
        with open(path, "w", encoding="utf-8") as f:
            while size < target:
                line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + ".\n"
                f.write(line)
                size += len(line.encode())
        files.append(path)
    return files


def train_tokenizer(folder: Path, files: list[Path], vocab: int) -> Path:
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


def plain_loop(files: list[Path], tokenizer: Path, out: Path) -> int:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    eos = backend.token_to_id("<eos>")
    chunks = []

    def encode(batch: list[str]) -> np.ndarray:
        ids: list[int] = []
        for encoding in backend.encode_batch(batch, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        return np.array(ids, dtype=np.uint16)

    for path in files:
        with open(path, encoding="utf-8") as f:
            batch: list[str] = []
            for line in f:
                batch.append(line.rstrip("\n"))
                if len(batch) == 1024:
                    chunks.append(encode(batch))
                    batch = []
            if batch:
                chunks.append(encode(batch))
    tokens = np.concatenate(chunks)
    np.save(out, tokens)
    return len(tokens)


def prepare(files: list[Path], tokenizer: Path, out: Path, workers: int) -> int:
    from slmforge.data.prepare import load_config, prepare_data

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(flags={"sources": [{"path": str(f)} for f in files], "tokenizer": str(tokenizer),
                             "out": str(out), "workers": workers})
    prepare_data(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(shapes: ShapeSet, device: torch.device, log=print) -> list[Row]:
    from slmforge.data.encode import default_workers

    case = shapes.data
    if case is None:
        return []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the baseline gets the library's threads
    cores = default_workers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_corpus(root, case.megabytes)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        tokenizer = train_tokenizer(root / "tok", files, case.vocab)
        for f in files:
            f.read_bytes()  # warm page cache for every contender alike
        contenders = {"plain": lambda: plain_loop(files, tokenizer, root / "plain.npy")}
        for workers in sorted({1, cores}):
            contenders[f"workers={workers}"] = (
                lambda w: lambda: prepare(files, tokenizer, root / f"out-{w}", w))(workers)
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        cpus: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for index in range(shapes.rounds):  # interleaved; the order alternates
            for name in (names if index % 2 == 0 else names[::-1]):
                cpu, wall = _cpu_seconds(), time.perf_counter()
                contenders[name]()
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(_cpu_seconds() - cpu)
        median = {name: sorted(v)[len(v) // 2] for name, v in walls.items()}
        cpu_median = {name: sorted(v)[len(v) // 2] for name, v in cpus.items()}
        for name in names[1:]:
            label = f"{megabytes:.1f} MB as/hi/en text, BPE vocab {case.vocab:,}, `data prepare` {name}"
            rows.append(Row("data", label, "MB/s", megabytes / median[name], megabytes / median["plain"],
                            "encode_batch + numpy loop",
                            notes=f"cpu s: {name} {cpu_median[name]:.2f}, plain {cpu_median['plain']:.2f}; "
                                  f"{cores} cores"))
            log(f"  data {name}: {megabytes / median[name]:.2f} MB/s vs plain {megabytes / median['plain']:.2f} MB/s")
    return rows
