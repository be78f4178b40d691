"""CPU training next to another busy process: torch's default threads vs the threads slmforge chooses.

    python -m benchmarks.bench_shared_cpu               # gemma3-tiny, 30 steps of 16 x 128, 3 rounds
    python -m benchmarks.bench_shared_cpu --steps 60 --rounds 5

Each round runs `slmforge pretrain` twice as a child process, on the same synthetic shards, with and
without a competing process (a Python busy loop, one core):

- baseline, "torch default": OMP_NUM_THREADS = the usable cores (what torch takes when alone);
- slmforge: OMP_NUM_THREADS unset, so training measures the other processes' load and takes the
  cores they leave (`runtime.cpu_threads_for_training`).

Sides alternate (and which goes first) round after round; the table gives the median wall seconds,
the children's CPU seconds beside them, and slmforge's speed-up (baseline wall / slmforge wall). A
competitor shows how much a shared machine costs; alone, both sides should be level.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from slmforge.data.shards import FORMAT, ShardWriter, dtype_for_vocab
from slmforge.fileio import write_json_atomic

VOCAB = 2048


def synthetic_shards(folder: Path, tokens: int = 400_000) -> Path:
    """A train/val token-shard folder of random Zipf-like ids (no tokenizer needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    manifest = {"format": FORMAT, "dtype": dtype_for_vocab(VOCAB).name, "vocab_size": VOCAB, "splits": {}}
    for split, count in (("train", tokens), ("val", tokens // 20)):
        writer = ShardWriter(folder, split, dtype_for_vocab(VOCAB), shard_tokens=1 << 20)
        ids = np.minimum(rng.zipf(1.3, size=count), VOCAB - 1).astype(np.int64)
        writer.add(ids, text_bytes=count)
        shards = writer.close()
        manifest["splits"][split] = {"shards": [vars(s) for s in shards], "tokens": count, "documents": 1,
                                     "bytes": count}
    write_json_atomic(folder / "manifest.json", manifest)
    return folder


def run_training(data: Path, out: Path, steps: int, threads: str | None) -> tuple[float, float]:
    """Wall and CPU seconds of one `slmforge pretrain` child process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    env["SLMFORGE_QUIET"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slmforge", "pretrain", "model.preset=gemma3-tiny",
                    f"model.vocab_size={VOCAB}", f"train.data={data}", "train.seq_len=128", "train.batch_size=16",
                    f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.device=cpu",
                    f"train.out_dir={out}", "train.resume=never"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sides = {"torch default": str(cores), "slmforge": None}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shards(Path(tmp) / "data")
        results = {}
        for condition in ("one busy process beside", "alone"):
            competitor = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                          if condition != "alone" else None)
            try:
                times = {name: [] for name in sides}
                for index in range(args.rounds):
                    order = list(sides) if index % 2 == 0 else list(sides)[::-1]
                    for name in order:
                        out = Path(tmp) / f"run-{condition[:4]}-{name[:5]}-{index}"
                        times[name].append(run_training(data, out, args.steps, sides[name]))
                results[condition] = times
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print(f"{args.steps} steps of gemma3-tiny, 16 x 128 tokens, {cores} cores; median of {args.rounds} "
          f"interleaved rounds (wall s, children's CPU s)")
    print(f"{'condition':<26} {'torch default':>20} {'slmforge':>20} {'speed-up':>9}")
    for condition, times in results.items():
        medians = {name: (statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows))
                   for name, rows in times.items()}
        base, ours = medians["torch default"], medians["slmforge"]
        print(f"{condition:<26} {base[0]:>10.1f} ({base[1]:>5.1f} cpu) {ours[0]:>10.1f} ({ours[1]:>5.1f} cpu) "
              f"{base[0] / ours[0]:>8.2f}x")


if __name__ == "__main__":
    main()
