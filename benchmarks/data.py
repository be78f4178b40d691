"""`data prepare` throughput on one big text file against the loop people write for it: read lines,
call the tokenizers library's `encode_batch` on batches of 1,024, append eos, save one .npy.

The baseline is that loop in one process with the library as it runs by default: `encode_batch` spreads
each batch over every core with its own thread pool (TOKENIZERS_PARALLELISM unset). The same loop held
to one thread (TOKENIZERS_PARALLELISM=false) is timed beside it as a second reference. `prepare_data`
also splits train/validation, hashes every document, writes shards, checkpoints and a manifest.

Synthetic Assamese/Hindi/English text, the lines of the three shuffled into one file: one source, so
`data prepare`'s workers read byte ranges of it themselves. Contenders alternate round by round (and
which goes first); medians are reported, with CPU seconds (worker processes included) beside wall."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Row, Timing, cpu_seconds, interleave
from benchmarks.shapes import ShapeSet

SYLLABLES = {
    "as": ["অ", "ক", "কা", "কি", "গ", "ঘৰ", "নদী", "মা", "নু", "হ", "ভা", "ষা", "ৰ", "ল", "স", "ত", "প"],
    "hi": ["क", "का", "कि", "भा", "र", "त", "ष", "ा", "न", "दी", "ल", "ग", "म", "स", "प", "है", "घर"],
    "en": ["th", "e", "ri", "ver", "tr", "ee", "peo", "ple", "lan", "gu", "age", "bo", "ok", "s", "in", "g"],
}
LOOP = "encode_batch loop"
LOOP_ONE_THREAD = "encode_batch loop, 1 thread"


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> Path:
    """One file of about `megabytes` MB: lines of 5-120 word-like tokens per language, shuffled."""
    rng = random.Random(seed)
    lines = []
    for syllables in SYLLABLES.values():
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
        size, target = 0, megabytes * 1e6 / len(SYLLABLES)
        while size < target:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + ".\n"
            lines.append(line)
            size += len(line.encode())
    rng.shuffle(lines)
    path = folder / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def train_tokenizer(folder: Path, corpus: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(corpus, encoding="utf-8") as f:
        sample = [line for _, line in zip(range(9000), f)]
    tok.train_from_iterator(sample, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return folder


@contextlib.contextmanager
def tokenizer_threads(enabled: bool) -> Iterator[None]:
    """The tokenizers library reads TOKENIZERS_PARALLELISM at every call: "false" keeps encode_batch on
    the calling thread; unset (the default) lets it use its thread pool, one thread per core."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def plain_loop(corpus: Path, tokenizer: Path, out: Path) -> int:
    """The baseline: lines -> encode_batch (1,024 at a time) -> ids + eos -> one uint16 .npy."""
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

    with open(corpus, encoding="utf-8") as f:
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


@contextlib.contextmanager
def texts_sent() -> Iterator[None]:
    """`data prepare` as it ran before byte ranges: the parent reads every line and sends the texts."""
    from slmforge.text.sources import SourceReader

    original = SourceReader.reads_by_range
    SourceReader.reads_by_range = lambda self: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        SourceReader.reads_by_range = original  # type: ignore[method-assign]


def prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> int:
    from slmforge.data.prepare import load_config, prepare_data

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(flags={"sources": [{"path": str(corpus)}], "tokenizer": str(tokenizer),
                             "out": str(out), "workers": workers})
    prepare_data(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))


def contenders(corpus: Path, tokenizer: Path, root: Path, cores: int,
               with_texts_sent: bool = False) -> dict[str, Callable[[], object]]:
    """Name -> callable, the baseline first. `data prepare` runs with the library's default threading
    (with workers = 1 it tokenizes in-process, where encode_batch may use every core too)."""
    def loop(threads: bool) -> Callable[[], object]:
        def run() -> object:
            with tokenizer_threads(threads):
                return plain_loop(corpus, tokenizer, root / "plain.npy")
        return run

    def prepare_with(workers: int, sent: bool = False) -> Callable[[], object]:
        def run() -> object:
            with tokenizer_threads(True), (texts_sent() if sent else contextlib.nullcontext()):
                return prepare(corpus, tokenizer, root / f"out-{workers}", workers)
        return run

    sides = {LOOP: loop(True), LOOP_ONE_THREAD: loop(False)}
    for workers in sorted({1, cores}):
        sides[f"data prepare workers={workers}"] = prepare_with(workers)
    if with_texts_sent and cores > 1:
        sides[f"data prepare workers={cores}, texts sent"] = prepare_with(cores, sent=True)
    return sides


def measure(megabytes: float, vocab: int, rounds: int, root: Path, cores: int, with_texts_sent: bool = False,
            log=print) -> tuple[float, dict[str, Timing]]:
    """(corpus MB, timings per contender) for one corpus, every contender `rounds` times, interleaved."""
    corpus = write_corpus(root, megabytes)
    size = corpus.stat().st_size / 1e6
    tokenizer = train_tokenizer(root / "tok", corpus, vocab)
    corpus.read_bytes()  # warm the page cache for every contender alike
    sides = contenders(corpus, tokenizer, root, cores, with_texts_sent)
    timings = interleave(sides, rounds, torch.device("cpu"), warmup=0, cpu_clock=cpu_seconds)
    return size, timings


def run(shapes: ShapeSet, device: torch.device, log=print) -> list[Row]:
    import tempfile

    from slmforge.data.encode import default_workers

    case = shapes.data
    if case is None:
        return []
    cores = default_workers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        megabytes, timings = measure(case.megabytes, case.vocab, shapes.rounds, Path(tmp), cores)
    loop, single = timings[LOOP], timings[LOOP_ONE_THREAD]
    for name, t in timings.items():
        if not name.startswith("data prepare"):
            continue
        label = f"{megabytes:.1f} MB as/hi/en text in one file, BPE vocab {case.vocab:,}, `{name}`"
        rows.append(Row("data", label, "MB/s", megabytes / t.median_wall, megabytes / loop.median_wall,
                        "encode_batch + numpy loop (library threads, default)",
                        notes=f"wall s (cpu s, workers included): {name} {t.median_wall:.2f} ({t.median_cpu:.2f}), "
                              f"loop {loop.median_wall:.2f} ({loop.median_cpu:.2f}), loop on 1 thread "
                              f"{single.median_wall:.2f} ({single.median_cpu:.2f}), so "
                              f"{single.median_wall / t.median_wall:.2f}x the 1-thread loop; {cores} cores",
                        extra={"rounds_wall": {n: x.wall for n, x in timings.items()},
                               "rounds_cpu": {n: x.cpu for n, x in timings.items()}}))
        log(f"  {name}: {megabytes / t.median_wall:.2f} MB/s vs loop {megabytes / loop.median_wall:.2f} MB/s "
            f"(1 thread: {megabytes / single.median_wall:.2f} MB/s)")
    return rows
