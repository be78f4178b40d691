"""python -m benchmarks [--device cuda|cpu] [--shapes smoke|cpu|gpu] [--only training,decoding,loss,data]
[--threads N] [--dtype float32|bfloat16] [--compile] [--match TEXT] [--rounds N] [--out DIR]"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

MEASUREMENTS = ("training", "decoding", "loss", "data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.shapes import SHAPES

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "slmforge against transformers (and plain baselines) in one run: training tokens/s, peak memory and "
        "MFU; decoding tokens/s; the large-vocabulary loss; data prepare MB/s. Prints one table of ratios "
        "(slmforge / baseline) and writes it as JSON and Markdown."))
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES),
                        help="size set: smoke (seconds), cpu (tiny models), gpu (the real shapes); "
                             "default gpu on cuda, cpu on cpu")
    parser.add_argument("--only", default=",".join(MEASUREMENTS),
                        help=f"comma-separated subset of {', '.join(MEASUREMENTS)}")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's choice, printed in the report)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="training/decoding precision (default: the shape set's: float32 on cpu, bf16 on gpu)")
    parser.add_argument("--compile", action="store_true",
                        help="training: torch.compile every block, on both sides; decoding: add slmforge's compiled "
                             "static decode (compile=true) as a third side, which --device cuda always does")
    parser.add_argument("--match", help="only training and decoding cases whose name contains this text")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default: the shape set's)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for the JSON and Markdown report (default: ./bench-results)")
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(args.only) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MEASUREMENTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    return args


def main(argv: list[str] | None = None, log=print) -> list:
    from benchmarks import data, decoding, loss, report, training
    from benchmarks.common import environment
    from benchmarks.shapes import SHAPES

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SHAPES[args.shapes or ("gpu" if device.type == "cuda" else "cpu")]
    if args.rounds or args.dtype:
        shapes = dataclasses.replace(shapes, rounds=args.rounds or shapes.rounds, dtype=args.dtype or shapes.dtype)
    if args.match:
        shapes = dataclasses.replace(shapes, training=[c for c in shapes.training if args.match in c.name],
                                     decoding=[c for c in shapes.decoding if args.match in c.name])
    compiled_decode = args.compile or device.type == "cuda"  # CUDA graphs: what issue 17's GPU target is about
    env = {**environment(device), "shapes": shapes.name, "dtype": shapes.dtype, "compile": args.compile,
           "compiled_decode": compiled_decode, "rounds": shapes.rounds}
    log(f"{env['date']}: {device} ({env['device_name']}), torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['threads']} threads of {env['cpu_count']} cores, shapes {shapes.name}, {shapes.dtype}, "
        f"{shapes.rounds} interleaved rounds (medians)")
    rows = []
    if "training" in args.only:
        rows += training.run(shapes, device, args.compile, log)
    if "decoding" in args.only:
        rows += decoding.run(shapes, device, log, compiled=compiled_decode)
    if "loss" in args.only:
        rows += loss.run(shapes, device, log)
    if "data" in args.only:
        rows += data.run(shapes, device, log)
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = os.getloadavg()[0]
    log("")
    log(report.text_table(rows))
    json_path, md_path = report.write(rows, env, args.out)
    log(f"\nwritten: {json_path}, {md_path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
