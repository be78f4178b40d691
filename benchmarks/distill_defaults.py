"""python -m benchmarks.distill_defaults [--sources markov,demo] [--objectives clm,mlm] [--seeds 1,2,3]
[--steps 80] [--conditions A,B] [--out DIR] [--keep-runs] [--merge-into RECORDED.json]

Issue 25: which distillation settings make a student better than the same student trained alone, over
several student/teacher pairs and both objectives (a causal-LM decoder student, a masked-LM encoder
student). Every condition of a pair trains the same student (same initial weights, same windows in the
same order, same masks, same steps, same optimizer) with `slmforge distill`; only [distill] differs:

    alone          alpha 1 (no teacher: the baseline every other condition is compared with)
    T1 a0 ...      fixed temperature T and alpha (T2 a0.5: the defaults before issue 25)
    T1 a0->1       alpha moved linearly from 0 to 1 over the run (distill.alpha_end)
    adaptive       distill.adaptive: alpha per batch from the teacher-student gap, T 1
    adaptive s0.9  the same with the gap smoothed over steps (distill.adaptive_smoothing = 0.9; s0.5: 0.5)

Reported: the student's final held-out loss on its own objective (validation measures the student alone:
next-token loss, or masked-token loss with the fixed evaluation masks), mean and spread (half the range)
over seeds, and the mean difference from `alone` in nats/token (negative: better than alone), with the
seeds on which the condition beat `alone`; and on how many seeds each of the control's warnings (distill.control)
came: its alone twin found the student worse than it would be alone, or the student caught up with its teacher.

Sources: `markov`, a random first-order Markov chain over 16 tokens (entropy rate printed: the floor no
model can pass), and `demo`, the built-in multilingual corpus of `slmforge data demo` with a 512-piece BPE
tokenizer. Teachers: a 2-layer model trained long (strong), the same trained briefly (weak), and for the
Markov source the same model after one step at lr 1e-8 (untrained: a teacher that should never help).
Students: 1 layer of 16 (small) and 2 layers of 32 (the teacher's shape, trained far less).

Writes DIR/<date>-cpu-distill-defaults.{md,json} (DIR: benchmarks/results) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONDITIONS: dict[str, dict] = {
    "alone": {"alpha": 1.0},
    "T1 a0": {"alpha": 0.0, "temperature": 1.0},
    "T1 a0.5": {"alpha": 0.5, "temperature": 1.0},
    "T2 a0": {"alpha": 0.0, "temperature": 2.0},
    "T2 a0.5": {"alpha": 0.5, "temperature": 2.0},
    "T8 a0": {"alpha": 0.0, "temperature": 8.0},
    "T1 a0->1": {"alpha": 0.0, "alpha_end": 1.0, "temperature": 1.0},
    "adaptive": {"adaptive": True, "temperature": 1.0},
    "adaptive s0.5": {"adaptive": True, "adaptive_smoothing": 0.5, "temperature": 1.0},
    "adaptive s0.9": {"adaptive": True, "adaptive_smoothing": 0.9, "temperature": 1.0},
}

# Model shapes by objective: the teacher's, and the two students'.
SHAPES = {
    "clm": {"teacher": {"preset": "test-tiny"},
            "small": {"preset": "test-tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                      "intermediate_size": 32},
            "mid": {"preset": "test-tiny"}},
    "mlm": {"teacher": {"preset": "bert-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                        "intermediate_size": 64, "max_seq_len": 64},
            "small": {"preset": "bert-tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                      "intermediate_size": 32, "max_seq_len": 64},
            "mid": {"preset": "bert-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                    "intermediate_size": 64, "max_seq_len": 64}},
}
TEACHER_STEPS = {"strong": 300, "weak": 40, "untrained": 1}
PAIRS = {"markov": [("small", "strong"), ("mid", "strong"), ("small", "weak"), ("small", "untrained")],
         "demo": [("small", "strong"), ("mid", "strong"), ("small", "weak")]}
SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_defaults", description=__doc__.split("\n\n")[1])
    p.add_argument("--sources", default="markov,demo")
    p.add_argument("--objectives", default="clm,mlm")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=80, help="student steps (teachers: 300 strong, 40 weak)")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--keep-runs", help="keep the run folders here instead of a temporary folder")
    p.add_argument("--report", help="print and write the table of a results JSON this script wrote, without training")
    p.add_argument("--merge-into", help="a results JSON this script wrote with the same pairs, seeds and steps: add "
                                        "this run's (or --report's) conditions to it, once the conditions both ran "
                                        "are checked equal")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data

def markov_chain(vocab: int, seed: int = 0, concentration: float = 0.3) -> tuple[np.ndarray, float]:
    """A random transition matrix (rows ~ Dirichlet(concentration)) and its entropy rate in nats/token."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(vocab, concentration), size=vocab)
    eigvals, eigvecs = np.linalg.eig(transition.T)
    stationary = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1))])
    stationary /= stationary.sum()
    row_entropy = -(transition * np.log(transition + 1e-300)).sum(axis=1)
    return transition, float((stationary * row_entropy).sum())


def markov_sample(transition: np.ndarray, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(transition, axis=1)
    out = np.empty(length, dtype=np.int64)
    state = 0
    for i, draw in enumerate(rng.random(length)):
        out[i] = state
        state = min(int(np.searchsorted(cumulative[state], draw)), len(transition) - 1)
    return out


def markov_data(folder: Path) -> tuple[Path, float]:
    """Token shards of the chain (train 60k tokens, val 8k) read through a word-level tokenizer whose ids are
    BERT's five special tokens then the chain's 16 states (a [MASK] for the encoder students)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from slmforge.data.shards import FORMAT, ShardWriter, dtype_for_vocab
    from slmforge.fileio import write_json_atomic
    from slmforge.tokenizer import Tokenizer

    transition, entropy = markov_chain(16)
    words = [f"s{i}" for i in range(16)]
    backend = Backend(models.WordLevel({t: i for i, t in enumerate([*SPECIALS.values(), *words])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIALS.values()))
    tokenizer = Tokenizer(backend, roles=dict(SPECIALS), meta={"kind": "wordlevel"})
    tokenizer.save(folder / "tokenizer")
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    manifest = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "splits": {},
                "tokenizer": {"path": str(folder / "tokenizer"), "sha256": tokenizer.sha256},
                "pad_id": tokenizer.pad_id}
    for split, (length, seed) in {"train": (60_000, 1), "val": (8_000, 2)}.items():
        writer = ShardWriter(data, split, dtype, shard_tokens=4096)
        writer.add(markov_sample(transition, length, seed) + len(SPECIALS), text_bytes=length)
        shards = writer.close()
        manifest["splits"][split] = {"shards": [vars(s) for s in shards], "tokens": length, "documents": 1,
                                     "bytes": length}
    write_json_atomic(data / "manifest.json", manifest)
    return data, entropy


def demo_data(folder: Path) -> Path:
    """The built-in corpus -> 512-piece BPE -> shards with a 5% validation split (as the quickstart does)."""
    from slmforge import config
    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.data.prepare import DataConfig, prepare_data
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer

    files = build_demo_corpus(folder / "corpus")
    train_tokenizer(config.from_dict(TokenizerConfig, {"kind": "bpe", "vocab_size": 512,
                                                       "inputs": [str(p) for p in files.values()]}, "tokenizer"),
                    folder / "tokenizer")
    prepare_data(config.from_dict(DataConfig, {
        "sources": [{"path": str(p), "lang": lang} for lang, p in files.items()],
        "tokenizer": str(folder / "tokenizer"), "out": str(folder / "data"), "val_fraction": 0.05}, "data"))
    return folder / "data"


# ---------------------------------------------------------------------------------------------- runs

def loop(data: Path, out: Path, seed: int, steps: int, batch_size: int, lr: float, warmup: int
         ) -> tuple[dict, dict, dict]:
    """The [train], [optim] and [schedule] tables of a run."""
    return {"data": str(data), "out_dir": str(out), "seq_len": 32, "batch_size": batch_size, "max_steps": steps,
            "eval_every": 0, "eval_batches": 16, "save_every": 0, "keep_last": 1, "log_every": steps,
            "seed": seed, "device": "cpu", "precision": "fp32", "resume": "never"}, {"lr": lr}, {"warmup_steps": warmup}


def train_teacher(objective: str, data: Path, strength: str, out: Path) -> tuple[Path, float]:
    from slmforge import config
    from slmforge.train.config import PretrainConfig
    from slmforge.train.pretrain import pretrain

    steps = TEACHER_STEPS[strength]
    train, optim, schedule = loop(data, out, 0, steps, 16, 1e-8 if strength == "untrained" else 3e-3,
                                  min(20, steps - 1))
    run = pretrain(config.from_dict(PretrainConfig, {
        "model": {**SHAPES[objective]["teacher"], "vocab_size": vocab_size(data)},
        "objective": {"kind": objective}, "train": train, "optim": optim, "schedule": schedule}))
    return run, final_val_loss(run)


def train_student(objective: str, data: Path, student: str, teacher: Path, condition: dict, seed: int, steps: int,
                  out: Path) -> tuple[float, str]:
    """The student's final held-out loss, and the control's warnings (empty: none)."""
    from slmforge import config
    from slmforge.distill.config import DistillRunConfig
    from slmforge.distill.run import distill

    train, optim, schedule = loop(data, out, seed, steps, 8, 1e-2, 5)
    cfg = config.from_dict(DistillRunConfig, {
        "model": {**SHAPES[objective][student], "vocab_size": vocab_size(data)}, "objective": {"kind": objective},
        "train": train, "optim": optim, "schedule": schedule, "distill": {"teacher": str(teacher), **condition}})
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        run = distill(cfg)
    warnings = [line for line in said.getvalue().splitlines() if line.startswith("warning: distill")]
    return final_val_loss(run), " | ".join(warnings)


def vocab_size(data: Path) -> int:
    from slmforge.data.shards import ShardSet

    return ShardSet(data, "train").vocab_size


def final_val_loss(run: Path) -> float:
    from slmforge.train.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]["loss"]


# ---------------------------------------------------------------------------------------------- report

def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def table(results: list[dict], conditions: list[str]) -> str:
    """One row per (source, objective, pair, condition); then the mean difference from alone per condition."""
    lines = ["| source | objective | student <- teacher (teacher val loss) | condition | val loss (mean ± spread) | "
             "vs alone (nats) | beat alone | twin: worse | caught up |", "|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, list[float]] = {c: [] for c in conditions}
    by_objective: dict[tuple[str, str], list[float]] = {}
    wins: dict[str, int] = {c: 0 for c in conditions}
    for case in results:
        alone = case["runs"]["alone"]
        for name in conditions:
            runs = case["runs"][name]
            losses = [r["loss"] for r in runs]
            deltas = [r["loss"] - a["loss"] for r, a in zip(runs, alone)]
            mean_delta = statistics.mean(deltas)
            if case["teacher_strength"] != "untrained":
                summary[name].append(mean_delta)
                by_objective.setdefault((name, case["objective"]), []).append(mean_delta)
                wins[name] += mean_delta < 0
            beat = sum(d < 0 for d in deltas)
            twin = sum("worse than it would be alone" in r["control"] for r in runs)
            caught_up = sum("has reached its teacher" in r["control"] for r in runs)
            pair = f"{case['student']} <- {case['teacher_strength']} ({case['teacher_loss']:.3f})"
            versus = ("", "") if name == "alone" else (f"{mean_delta:+.4f}", f"{beat}/{len(runs)}")
            lines.append(f"| {case['source']} | {case['objective']} | {pair} | {name} | "
                         f"{statistics.mean(losses):.4f} ± {spread(losses):.4f} | {versus[0]} | {versus[1]} | "
                         f"{twin}/{len(runs)} | {caught_up}/{len(runs)} |")
    lines += ["", "Over the pairs with a trained teacher: mean difference from alone (nats/token; negative = better), "
              "the same mean per objective, worst pair, pairs where the condition beat alone.", "",
              "| condition | mean vs alone | causal LM | masked LM | worst pair | pairs better than alone |",
              "|---|---|---|---|---|---|"]
    for name in conditions:
        if name == "alone" or not summary[name]:
            continue
        per = [f"{statistics.mean(by_objective[(name, o)]):+.4f}" if (name, o) in by_objective else ""
               for o in ("clm", "mlm")]
        lines.append(f"| {name} | {statistics.mean(summary[name]):+.4f} | {per[0]} | {per[1]} | "
                     f"{max(summary[name]):+.4f} | {wins[name]}/{len(summary[name])} |")
    return "\n".join(lines)


def write(stem: Path, conditions_text: str, args: dict, results: list[dict], conditions: list[str]) -> None:
    text = table(results, conditions)
    print(f"\n{conditions_text}\n\n{text}\n")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(f"# python -m benchmarks.distill_defaults\n\n{conditions_text}\n\n{text}\n",
                                       encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"conditions": conditions_text, "args": args,
                                                     "results": results}, indent=1), encoding="utf-8")
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text(encoding="utf-8"))
        if args.merge_into:  # a finished run's results into a recorded one
            timing = re.search(r"\d+ s wall, \d+ s CPU", saved["conditions"])
            merge_into(Path(args.merge_into), saved["results"], list(saved["results"][0]["runs"]),
                       timing[0] if timing else "time not recorded")
            return 0
        write(Path(args.report).with_suffix(""), saved["conditions"], saved["args"], saved["results"],
              list(saved["results"][0]["runs"]))
        return 0
    os.environ.setdefault("SLMFORGE_QUIET", "1")
    torch.set_num_threads(1)  # tiny models: a second thread gains nothing, and the figures do not depend on it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = args.conditions.split(",")
    work = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="distill-defaults-"))
    wall, cpu = time.perf_counter(), time.process_time()
    results, notes = [], []
    try:
        for source in args.sources.split(","):
            if source == "markov":
                data, entropy = markov_data(work / "markov")
                notes.append(f"markov: entropy rate {entropy:.4f} nats/token (no model can go below it)")
            else:
                data = demo_data(work / "demo")
            for objective in args.objectives.split(","):
                teachers = {}
                for student, strength in PAIRS[source]:
                    if strength not in teachers:
                        teachers[strength] = train_teacher(objective, data, strength,
                                                           work / f"{source}-{objective}-teacher-{strength}")
                    teacher, teacher_loss = teachers[strength]
                    case = {"source": source, "objective": objective, "student": student,
                            "teacher_strength": strength, "teacher_loss": teacher_loss, "runs": {}}
                    for name in conditions:
                        case["runs"][name] = []
                        for seed in seeds:
                            out = work / f"{source}-{objective}-{student}-{strength}-{name.replace(' ', '_')}-{seed}"
                            loss, control = train_student(objective, data, student, teacher, CONDITIONS[name], seed,
                                                          args.steps, out)
                            case["runs"][name].append({"seed": seed, "loss": loss, "control": control})
                            if not args.keep_runs:
                                shutil.rmtree(out, ignore_errors=True)
                        losses = [r["loss"] for r in case["runs"][name]]
                        print(f"{source} {objective} {student} <- {strength} ({teacher_loss:.3f}) {name}: "
                              f"{statistics.mean(losses):.4f}", file=sys.stderr, flush=True)
                    results.append(case)
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    timing = f"{time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU"
    conditions_text = (f"students trained {args.steps} steps of 8 x 32 tokens (AdamW lr 1e-2, 5 warmup steps), "
                       f"teachers 300 (strong) / 40 (weak) steps of 16 x 32 at lr 3e-3; forward KL; seeds "
                       f"{args.seeds}; validation: 16 batches of 8 x 32 held-out tokens; CPU, 1 torch thread, torch "
                       f"{torch.__version__}; {timing}. {' '.join(notes)}")
    write(Path(args.out) / f"{time.strftime('%Y-%m-%d')}-cpu-distill-defaults", conditions_text, vars(args), results,
          conditions)
    if args.merge_into:
        merge_into(Path(args.merge_into), results, conditions, timing)
    return 0


def merge_into(recorded: Path, results: list[dict], conditions: list[str], timing: str) -> None:
    """Add this run's conditions and seeds to a recorded run's results (same pairs and steps). A run of a
    (condition, seed) both hold must have given the same final loss (the runs are deterministic), or
    nothing is merged: the figures would not compare."""
    saved = json.loads(recorded.read_text(encoding="utf-8"))
    by_pair = {(c["source"], c["objective"], c["student"], c["teacher_strength"]): c for c in saved["results"]}
    for case in results:
        old = by_pair[(case["source"], case["objective"], case["student"], case["teacher_strength"])]
        for name in conditions:
            known = {r["seed"]: r["loss"] for r in old["runs"].get(name, [])}
            for run in case["runs"][name]:
                if run["seed"] in known and known[run["seed"]] != run["loss"]:
                    raise SystemExit(f"{recorded}: {name} seed {run['seed']} on {case['source']} {case['objective']} "
                                     f"{case['student']} <- {case['teacher_strength']} gave another loss than "
                                     f"recorded; not merged")
    added: dict[int, list[str]] = {}  # seed -> conditions this run added
    shared: dict[int, list[str]] = {}  # seed -> conditions this run reproduced
    for case in results:
        old = by_pair[(case["source"], case["objective"], case["student"], case["teacher_strength"])]
        for name in conditions:
            runs = {r["seed"]: r for r in old["runs"].get(name, [])}
            for run in case["runs"][name]:
                into = shared if run["seed"] in runs else added
                if name not in into.setdefault(run["seed"], []):
                    into[run["seed"]].append(name)
                runs.setdefault(run["seed"], run)
            old["runs"][name] = [runs[seed] for seed in sorted(runs)]
    seeds = {name: [r["seed"] for r in runs] for name, runs in saved["results"][0]["runs"].items()}
    if len({tuple(v) for v in seeds.values()}) > 1:
        print(f"note: the conditions now hold different seeds: {seeds}", file=sys.stderr)

    def listed(by_seed: dict[int, list[str]]) -> str:
        return "; ".join(f"seed {seed}: {', '.join(names)}" for seed, names in sorted(by_seed.items()))

    text = (f"{saved['conditions']} Added by a later run ({timing}): {listed(added)}"
            + (f" (its {listed(shared)} reproduced the recorded losses exactly)." if shared else "."))
    saved["args"]["seeds"] = ",".join(str(s) for s in sorted({s for v in seeds.values() for s in v}))
    write(recorded.with_suffix(""), text, saved["args"], saved["results"], list(saved["results"][0]["runs"]))

if __name__ == "__main__":
    raise SystemExit(main())
