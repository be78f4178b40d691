"""`slmforge data prepare`: the data verbs; each handler loads a config and calls one function."""

from __future__ import annotations

import argparse
from typing import Any

from slmforge import config


def register(subparsers: Any) -> None:
    from slmforge.cli import HelpFormatter, add_config_arguments

    data = subparsers.add_parser("data", help="turn raw text into token shards",
                                 description="Data verbs: `slmforge data prepare --help`.",
                                 formatter_class=HelpFormatter)
    verbs = data.add_subparsers(dest="data_verb", metavar="SUBVERB")
    data.set_defaults(func=lambda args: data.print_help())

    prepare = verbs.add_parser(
        "prepare", formatter_class=HelpFormatter,
        help="tokenize text sources (a language mixture) into train/val token shards",
        description="Tokenize the [data] sources with the tokenizer into train/val shards and a "
                    "manifest.json. Interrupted? Rerun the same command: it resumes.",
        epilog="examples:\n"
               "  slmforge data prepare --input corpus.txt --tokenizer tok/ --out data/\n"
               "  slmforge data prepare -c run.toml data.workers=4 data.val_documents=2000\n"
               "A data.field=value word is an override wherever it stands, also after --input.")
    add_config_arguments(prepare, "data.workers=4 data.val_fraction=0.02")
    prepare.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                         help="text sources (file, folder, glob or hf:NAME); replaces data.sources")
    prepare.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (data.tokenizer)")
    prepare.add_argument("--out", metavar="DIR", help="output folder (data.out)")
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from slmforge.data.prepare import SECTION, DataConfig, load_config, prepare_data
    from slmforge.text.sources import SourceConfig

    if args.show_fields:
        print("\n".join(config.describe(DataConfig, SECTION)
                        + config.describe(SourceConfig, f"{SECTION}.sources[]")))
        return 0
    flags: dict[str, Any] = {}
    if args.input:
        flags["sources"] = [{"path": p} for p in args.input]
    if args.tokenizer:
        flags["tokenizer"] = args.tokenizer
    if args.out:
        flags["out"] = args.out
    prepare_data(load_config(args.config, args.overrides, flags))
    return 0
