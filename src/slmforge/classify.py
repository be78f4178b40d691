"""`slmforge classify`: a classify / tag fine-tune's (or an imported *ForSequenceClassification /
*ForTokenClassification's) predictions for a file of texts, as JSONL with scores."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
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

    from slmforge.errors import SlmforgeError
    from slmforge.finetune.classify import predict_lines
    from slmforge.formatting import say
    from slmforge.runs import open_run
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
