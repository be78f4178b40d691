"""`slmforge distill`."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter, add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="pretrain a student with a teacher's distributions mixed into its loss (KL, JS, TV)",
        description="Pretraining (sections model, objective, optim, schedule, train, tracking, parallel) plus "
                    "[distill]: teacher (a run or a local Hugging Face folder), alpha, temperature, divergence. "
                    "Re-running the same command resumes.\n\nexamples:\n"
                    "  slmforge distill -c recipes/xlmr-hindi-distill.toml\n"
                    "  slmforge distill model.preset=bert-tiny distill.teacher=runs/teacher train.data=data "
                    "train.out_dir=runs/student",
        formatter_class=HelpFormatter)
    add_config_arguments(p, "distill.alpha=0.3 distill.temperature=4")
    p.add_argument("--build-cache", metavar="DIR",
                   help="do not train: run the teacher once over every sample the run will see and keep its top-k "
                        "logits (distill.top_k) in DIR; then train with distill.teacher_cache=DIR")
    p.add_argument("--processes", type=int, default=1,
                   help="with --build-cache: the number of processes the run will train on (samples per step)")
    p.set_defaults(func=_run)

    t = sub.add_parser(
        "trim-vocab", help="cut a model's (or tokenizer's) vocabulary to the tokens a corpus uses",
        description="Keep the tokens that --text uses (at least --min-count times), the special tokens and "
                    "byte tokens; write the cut tokenizer and, if SOURCE holds a model (an slmforge run or a "
                    "Hugging Face folder), the model with only those embedding and output rows. Prints what "
                    "was kept and saved; trim_report.json records it.\n\nexample:\n"
                    "  slmforge trim-vocab hf/xlm-roberta-base --text corpora/hi/ --out runs/xlmr-hi",
        formatter_class=HelpFormatter)
    t.add_argument("source", help="run folder, Hugging Face model folder, or tokenizer folder")
    t.add_argument("--text", action="append", required=True, metavar="PATH",
                   help="corpus files or folders (text, JSONL, Parquet; repeatable)")
    t.add_argument("--out", required=True, help="folder to write (a run folder when SOURCE has a model)")
    t.add_argument("--min-count", type=int, default=1, help="keep tokens used at least this often (default 1)")
    t.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    t.set_defaults(func=_trim)


def _run(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.distill.config import DistillRunConfig
    from slmforge.distill.run import distill
    from slmforge.train.parallel import environment

    if args.show_fields:
        print("\n".join(config.describe(DistillRunConfig)))
        return 0
    cfg = config.load_recipe(DistillRunConfig, args.config, args.overrides)
    if args.build_cache:
        from slmforge.distill.run import build_teacher_cache
        from slmforge.train.signals import released

        with released():  # no training: a signal ends the cache build as it would any other verb
            print(build_teacher_cache(cfg, args.build_cache, args.processes))
        return 0
    run_dir = distill(cfg)
    if environment().is_main:  # one line per job, not per process
        print(run_dir)
    return 0


def _trim(args: argparse.Namespace) -> int:
    from slmforge.distill.trim import trim_vocab
    from slmforge.errors import SlmforgeError

    if args.min_count < 1:
        raise SlmforgeError(f"--min-count: must be at least 1, got {args.min_count}")
    r = trim_vocab(args.source, args.text, args.out, args.min_count, args.force)
    line = (f"kept {r['vocab_after']:,} of {r['vocab_before']:,} tokens ({100 * r['kept_share']:.1f}%), covering "
            f"{100 * r['covered_share']:.2f}% of the corpus's {r['corpus_tokens']:,} tokens; "
            f"{r['changed_documents']} document(s) now encode differently, {r['unk_tokens_after']} unknown and "
            f"{r['byte_tokens_after']} byte token(s)")
    if "parameters_before" in r:
        line += (f"; parameters {r['parameters_before']:,} -> {r['parameters_after']:,} "
                 f"({100 * (1 - r['parameters_after'] / r['parameters_before']):.1f}% fewer)")
    print(line)
    print(args.out)
    return 0
