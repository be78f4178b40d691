"""`slmforge eval`: a trained model's loss, perplexity and bits per byte (causal LM) or masked-token
accuracy (masked LM)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity, bits per byte / masked accuracy on held-out data or text",
                       description="Evaluate a run (or checkpoint) with the objective it was trained with, on "
                                   "prepared shards (--data) and/or raw UTF-8 text files (--text [name=]FILE, "
                                   "e.g. --text hi=hindi.txt for a per-language table). Causal LMs: loss, "
                                   "perplexity, bits per byte. Masked LMs: masked-token loss, perplexity and "
                                   "accuracy, masks drawn from a fixed seed. Results go to eval.json in the "
                                   "checkpoint folder, one entry per evaluated set (name or data:split); "
                                   "a later eval adds or replaces entries and keeps the others.")
    p.add_argument("model", help="run folder or checkpoint folder")
    p.add_argument("--data", help="prepared data folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", help="split of --data to evaluate (default val)")
    p.add_argument("--text", action="append", default=[], metavar="[NAME=]FILE",
                   help="UTF-8 text file, one document per line, evaluated exactly (repeatable)")
    p.add_argument("--examples", action="append", default=[], metavar="[NAME=]FILE",
                   help="fine-tuned runs: JSONL examples in the run's format; loss on the answers, and exact "
                        "match / chrF of greedy answers to the first --samples of them (repeatable)")
    p.add_argument("--samples", type=int, default=16, help="examples answered by generation (--examples)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer (--examples)")
    p.add_argument("--seq-len", type=int, help="context per window (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, help="limit the number of batches from --data")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from slmforge.errors import SlmforgeError
    from slmforge.eval.evaluate import (
        evaluate_documents,
        evaluate_shards,
        print_table,
        read_documents,
        run_objective,
    )
    from slmforge.runs import open_run, write_eval_report
    from slmforge.runtime import resolve_device

    if (args.seq_len is not None and args.seq_len < 1) or args.batch_size < 1:
        raise SlmforgeError("--seq-len and --batch-size must be positive")
    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    model, meta = run.model, run.meta
    tokenizer = run.tokenizer() if args.text else None
    seq_len = args.seq_len or meta.get("seq_len") or model.cfg.max_seq_len
    rows = {}
    data = Path(args.data) if args.data else (run.data_dir() if not (args.text or args.examples) else None)
    # The run's training objective scores --data and --text; --examples brings its own format.
    objective = run_objective(run, tokenizer) if data is not None or args.text else None
    if data is not None and not args.data and not (data / "manifest.json").is_file():
        raise SlmforgeError(f"{data}: the data folder this run trained on ({run.step_dir / 'meta.json'}) is "
                            f"not there; pass --data DIR (a folder made by `slmforge data prepare`) or "
                            f"--text NAME=FILE")
    if data is not None:
        # Rows are keyed by what was evaluated and say where it came from; eval.json keeps other keys.
        rows[f"{data.name}:{args.split}"] = {
            **evaluate_shards(model, objective, data, args.split, seq_len, args.batch_size, args.max_batches),
            "data": str(data), "split": args.split}
    for item in args.text:
        name, _, path = item.rpartition("=")
        rows[name or Path(path).name] = {
            **evaluate_documents(model, objective, tokenizer, read_documents(path), seq_len, path,
                                 add_bos=meta.get("add_bos", True)),
            "text": path}
    for item in args.examples:
        from slmforge.finetune.evaluate import evaluate_example_file, write_samples

        name, _, path = item.rpartition("=")
        name = name or Path(path).stem
        rows[name], samples = evaluate_example_file(run, path, args.batch_size, args.samples, args.max_new_tokens)
        if samples:
            write_samples(samples, run.step_dir, f"samples-{name}")
    if not rows:
        raise SlmforgeError(f"{args.model}: nothing to evaluate: the run recorded no data folder; pass --data DIR, "
                            f"--text NAME=FILE or (fine-tuned runs) --examples FILE")
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print_table(rows)
    write_eval_report(rows, run.step_dir / "eval.json")
    return 0
