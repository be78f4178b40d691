"""Throughput of `data prepare` on one big text file against a plain tokenize-and-save loop, in one run.

    python -m benchmarks.bench_data_prepare                 # 24 MB synthetic Assamese/Hindi/English text
    python -m benchmarks.bench_data_prepare --mb 100 --vocab 16000 --rounds 7

Contenders (benchmarks/data.py): the baseline loop in one process with the tokenizers library's default
threading (encode_batch on every core), the same loop on one thread, `data prepare` with 1 worker and
with all cores (the workers read byte ranges of the file themselves), and all cores with the texts read
by the parent and sent to the workers (the path before byte ranges). They alternate round by round,
and which goes first alternates too; medians, CPU seconds (workers included) beside wall seconds, every
round, and the load average before and after: on a shared machine a ratio is evidence only when the
CPU seconds agree with it and the load was low.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.data import LOOP, LOOP_ONE_THREAD, measure


def main() -> None:
    from slmforge.data.encode import default_workers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    args = parser.parse_args()
    cores = default_workers()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        megabytes, timings = measure(args.mb, args.vocab, args.rounds, Path(tmp), cores, with_texts_sent=True)
    load_after = os.getloadavg()
    print(f"corpus {megabytes:.1f} MB in one file, vocab {args.vocab}, {cores} cores, median of {args.rounds} "
          f"interleaved rounds; load average (1/5/15 min) {_load(load_before)} before, {_load(load_after)} after")
    base, single = timings[LOOP].median_wall, timings[LOOP_ONE_THREAD].median_wall
    print(f"{'':40s} {'MB/s':>6s} {'wall s':>7s} {'cpu s':>7s}  {'vs loop':>7s} {'vs 1 thread':>11s}  rounds (wall s)")
    for name, t in timings.items():
        rounds = ", ".join(f"{w:.2f}" for w in t.wall)
        print(f"{name:40s} {megabytes / t.median_wall:6.2f} {t.median_wall:7.2f} {t.median_cpu:7.2f}  "
              f"{base / t.median_wall:6.2f}x {single / t.median_wall:10.2f}x  {rounds}")
    print("(data prepare also writes one bos per document, hashes each for the validation split, writes shards, "
          "checkpoints and a manifest)")


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
