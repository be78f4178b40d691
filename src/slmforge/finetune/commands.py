"""`slmforge finetune`, `slmforge make-infill` and `slmforge classify` (a classify / tag fine-tune's
(or an imported *ForSequenceClassification / *ForTokenClassification's) predictions for a file of
texts, as JSONL with scores)."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter, add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune on examples: prompt-masked SFT, chat, infilling (decoders), translation (both); full or LoRA",
        description="Fine-tune from a TOML config (sections finetune, lora, optim, schedule, train, tracking, "
                    "parallel) with key.sub=value overrides. Re-running the same command resumes.\n\nexamples:\n"
                    "  slmforge finetune train.init_from=runs/base finetune.train_files='[\"qa.jsonl\"]' "
                    "train.out_dir=runs/qa\n"
                    "  slmforge finetune -c recipes/gemma3-multilingual-clarify.toml lora.rank=16",
        formatter_class=HelpFormatter)
    add_config_arguments(p, "lora.rank=16 finetune.packing=false")
    p.set_defaults(func=_finetune)

    m = sub.add_parser(
        "make-infill", help="make infilling examples (fill-in-the-middle or blanks) from a plain corpus",
        description="Write JSONL infilling examples for `slmforge finetune` from text, JSONL or Parquet "
                    "sources: --style fim gives prefix/suffix/middle (finetune.task = \"fim\"), --style blanks "
                    "gives prompt/response with spans blanked out (finetune.task = \"chat\").",
        formatter_class=HelpFormatter)
    m.add_argument("--input", nargs="+", required=True, metavar="PATH", help="corpus files, folders or globs")
    m.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    m.add_argument("--style", default="fim", choices=["fim", "blanks"])
    m.add_argument("--span-words", type=int, default=4, help="mean span length in words")
    m.add_argument("--spans", type=int, default=2, help="spans per document (blanks)")
    m.add_argument("--min-words", type=int, default=6, help="skip shorter documents")
    m.add_argument("--limit", type=int, default=0, help="examples at most (0 = one per document)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_make_infill)
    _register_classify(sub)


def _finetune(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.finetune.config import FinetuneConfig
    from slmforge.finetune.run import finetune
    from slmforge.train.parallel import environment

    if args.show_fields:
        print("\n".join(config.describe(FinetuneConfig)))
        return 0
    run_dir = finetune(config.load_recipe(FinetuneConfig, args.config, args.overrides))
    if environment().is_main:  # one line per job, not per process
        print(run_dir)
    return 0


def _make_infill(args: argparse.Namespace) -> int:
    from slmforge.finetune.tasks import InfillConfig, write_infill_file

    cfg = InfillConfig(style=args.style, min_words=args.min_words, span_words=args.span_words, spans=args.spans,
                       seed=args.seed, limit=args.limit)
    count = write_infill_file(args.input, args.out, cfg)
    print(f"{count} {args.style} examples -> {args.out}")
    return 0


def _register_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify", help="label texts (classify) or tag words (tag) with a fine-tuned encoder; JSONL with scores",
        description="Predict with a run fine-tuned with finetune.task = \"classify\" or \"tag\" (or an imported "
                    "classification model). --input is JSONL in the run's fields (text / text_pair, or tokens) "
                    "or, for any other file name, plain text with one text per line (tag: words split on "
                    "whitespace); empty lines are skipped. Each non-empty line gives one JSON line, in order:\n"
                    "  classify   {\"label\": ..., \"score\": p, \"scores\": {label: p, ...}}\n"
                    "  tag        {\"tokens\": [...], \"tags\": [...], \"scores\": [p per word]}\n\n"
                    "examples:\n"
                    "  slmforge classify runs/sentiment --input reviews.txt\n"
                    "  slmforge classify runs/ner --input sentences.jsonl --out tagged.jsonl",
        formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--input", required=True, metavar="FILE", help="JSONL (.jsonl, .json, .gz/.zst) or plain text")
    p.add_argument("--out", metavar="FILE", help="JSONL file to write (default: standard output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_classify)


def _classify(args: argparse.Namespace) -> int:
    import json
    import sys

    from slmforge.checkpoint.reading import open_run
    from slmforge.errors import SlmforgeError
    from slmforge.finetune.classify import predict_lines
    from slmforge.formatting import say
    from slmforge.runtime import resolve_device

    if args.batch_size < 1:
        raise SlmforgeError("--batch-size must be positive")
    run = open_run(args.run, device=resolve_device(args.device, "--device"))
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in predict_lines(run, args.input, args.batch_size))
    if args.out:
        from slmforge.fileio import write_text_atomic

        text = "".join(lines)
        write_text_atomic(args.out, text)
        say(f"{text.count(chr(10))} prediction(s) -> {args.out}")
    else:
        for line in lines:
            sys.stdout.write(line)
    return 0
