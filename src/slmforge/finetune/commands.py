"""`slmforge finetune` and `slmforge make-infill`."""

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
