"""`slmforge eval`: a trained model's loss, perplexity and bits per byte (causal LM) or masked-token
accuracy (masked LM); with --tasks, benchmarks through lm-evaluation-harness (eval/harness.py)."""

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
                                   "a later eval adds or replaces entries and keeps the others. --tasks runs "
                                   "lm-evaluation-harness benchmarks on the run's own model (pip install "
                                   "'slmforge[eval]'); --list-tasks shows those it knows per language.")
    p.add_argument("model", nargs="?", help="run folder or checkpoint folder")
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
    harness = p.add_argument_group("lm-evaluation-harness benchmarks (pip install 'slmforge[eval]')")
    harness.add_argument("--tasks", action="append", default=[], metavar="TASK[,TASK...]",
                         help="lm-eval task, group or tag names, comma-separated (repeatable), e.g. "
                              "belebele_hin_Deva,xnli_hi; results go to eval.json as lm-eval:TASK")
    harness.add_argument("--num-fewshot", type=int, metavar="N",
                         help="few-shot examples per prompt (default: each task's own, else 0)")
    harness.add_argument("--limit", metavar="N",
                         help="examples per task: a count, or a fraction below 1 (for quick checks; not a "
                              "full benchmark score)")
    harness.add_argument("--include-path", action="append", default=[], metavar="DIR",
                         help="folder (or YAML file) of your own task configs, beside lm-eval's (repeatable)")
    harness.add_argument("--offline", action="store_true",
                         help="never try the network for task data: tasks must be in the datasets cache "
                              "(fails at once instead of after the hub client's retries)")
    harness.add_argument("--list-tasks", nargs="*", metavar="LANG",
                         help="list the tasks the installed lm-eval knows for these languages (hi, as, bn, "
                              "mr, ta, de, en; default all of them) and exit; needs no model")
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
    from slmforge.checkpoint.reading import open_run, write_eval_report
    from slmforge.runtime import resolve_device

    if args.list_tasks is not None:
        from slmforge.eval.harness import list_tasks

        list_tasks(args.list_tasks, args.include_path)
        return 0
    if not args.model:
        raise SlmforgeError("eval: name a run or checkpoint folder (or --list-tasks to list benchmark tasks)")
    if (args.seq_len is not None and args.seq_len < 1) or args.batch_size < 1:
        raise SlmforgeError("--seq-len and --batch-size must be positive")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SlmforgeError(f"--num-fewshot: must be 0 or more, got {args.num_fewshot}")
    tasks = [name.strip() for item in args.tasks for name in item.split(",") if name.strip()]
    if args.tasks and not tasks:
        raise SlmforgeError("--tasks: name at least one task")
    if not tasks and (args.limit is not None or args.num_fewshot is not None):
        raise SlmforgeError("--limit and --num-fewshot apply to --tasks (lm-eval benchmarks)")
    if tasks:
        from slmforge.eval.harness import parse_limit, require_lm_eval

        require_lm_eval()  # before the model is loaded: a missing extra is said at once
        args.limit = parse_limit(args.limit) if args.limit is not None else None
    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    model, info = run.model, run.info
    tokenizer = run.tokenizer() if args.text else None
    seq_len = args.seq_len or info.seq_len or model.cfg.max_seq_len
    rows = {}
    data = Path(args.data) if args.data else (run.data_dir() if not (args.text or args.examples or tasks) else None)
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
                                 add_bos=info.add_bos),
            "text": path}
    for item in args.examples:
        from slmforge.finetune.evaluate import evaluate_example_file, write_samples

        name, _, path = item.rpartition("=")
        name = name or Path(path).stem
        rows[name], samples = evaluate_example_file(run, path, args.batch_size, args.samples, args.max_new_tokens)
        if samples:
            write_samples(samples, run.step_dir, f"samples-{name}")
    benchmarks = _run_benchmarks(run, tasks, args) if tasks else {}
    if not rows and not benchmarks:
        raise SlmforgeError(f"{args.model}: nothing to evaluate: the run recorded no data folder; pass --data DIR, "
                            f"--text NAME=FILE, (fine-tuned runs) --examples FILE or --tasks TASK")
    if args.json:
        print(json.dumps({**rows, **benchmarks}, indent=2, ensure_ascii=False))
    else:
        if rows:
            print_table(rows)
        if benchmarks:
            from slmforge.eval.harness import print_harness_table

            print_harness_table(benchmarks)
    write_eval_report({**rows, **benchmarks}, run.step_dir / "eval.json")
    return 0


def _run_benchmarks(run, tasks: list[str], args: argparse.Namespace) -> dict:
    """lm-eval tasks on the run's model: eval.json rows `lm-eval:TASK`."""
    from slmforge.eval.harness import backend_for, go_offline, harness_rows, run_tasks

    limit = args.limit  # parsed in _run
    if args.offline:
        go_offline()
    lm = backend_for(run, batch_size=args.batch_size)
    results = run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit, include_path=args.include_path)
    return harness_rows(results, limit)
