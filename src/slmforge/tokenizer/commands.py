"""`slmforge tokenizer train|import|report`: each a few lines around one library function."""

from __future__ import annotations

import argparse

from slmforge import config
from slmforge.errors import SlmforgeError


def register(subparsers) -> None:
    from slmforge.arguments import HelpFormatter, add_config_arguments

    group = subparsers.add_parser("tokenizer", help="train, import and compare tokenizers",
                                  description=__doc__, formatter_class=HelpFormatter)
    verbs = group.add_subparsers(dest="tokenizer_verb", metavar="VERB")
    group.set_defaults(func=lambda args: group.print_help())

    train = verbs.add_parser(
        "train", help="train a tokenizer (bpe, bytelevel, unigram, wordpiece) on text files or a mixture",
        description="Train a tokenizer from the [tokenizer] section of a TOML config.\n"
                    "  slmforge tokenizer train --input hi.txt as.txt --out tok tokenizer.vocab_size=16000",
        formatter_class=HelpFormatter)
    add_config_arguments(train, "tokenizer.vocab_size=16000 tokenizer.kind=unigram")
    train.add_argument("--input", nargs="+", metavar="FILE",
                       help="training text files/folders (.txt, .jsonl, .parquet, .gz/.zst); "
                            "replaces tokenizer.inputs")
    train.add_argument("--out", help="output folder (required unless --show-fields)")
    train.add_argument("--force", action="store_true",
                       help="replace the tokenizer in --out (data prepared with it will no longer match)")
    train.set_defaults(func=_train)

    imp = verbs.add_parser(
        "import", help="convert an HF tokenizer folder or a SentencePiece .model to our folder format",
        formatter_class=HelpFormatter)
    imp.add_argument("src", help="folder with tokenizer.json or *.model, or the file itself")
    imp.add_argument("--out", required=True, help="output folder")
    imp.add_argument("--force", action="store_true", help="replace the tokenizer in --out")
    imp.set_defaults(func=_import)

    report = verbs.add_parser(
        "report", help="compare tokenizers per language: fertility, bytes/token, byte fallback, unk",
        description="  slmforge tokenizer report tok_a tok_b --text hi=hi.txt --text as=as.txt --out rep",
        formatter_class=HelpFormatter)
    report.add_argument("tokenizers", nargs="+", metavar="TOKENIZER", help="tokenizer folders")
    report.add_argument("--text", action="append", required=True, metavar="LANG=FILE",
                        help="a language's sample text (repeat per language)")
    report.add_argument("--out", help="folder for report.json, report.txt and report.png")
    report.add_argument("--max-lines", type=int, help="read at most this many lines per text file")
    report.set_defaults(func=_report)


def refuse_to_overwrite(out: str, force: bool) -> None:
    """A tokenizer folder is what data shards and runs were made with: replacing it in place would
    silently change the vocabulary under them, so it takes --force."""
    from pathlib import Path

    folder = Path(out)
    if force or not folder.exists():
        return
    if not folder.is_dir():
        raise SlmforgeError(f"--out {out}: exists and is not a folder")
    if any(folder.iterdir()):
        what = "a tokenizer" if (folder / "tokenizer.json").is_file() else "files"
        raise SlmforgeError(f"--out {out}: already holds {what}; choose another folder, or pass --force to "
                            f"replace it (data prepared with the old one will then be refused)")


def _train(args: argparse.Namespace) -> int:
    from slmforge.tokenizer.config import SECTION, TokenizerConfig, load_config
    from slmforge.tokenizer.train import train_tokenizer

    if args.show_fields:
        print("\n".join(config.describe(TokenizerConfig, SECTION)))
        return 0
    if not args.out:
        raise SlmforgeError("tokenizer train: --out DIR is required")
    cfg = load_config(args.config, args.overrides)
    refuse_to_overwrite(args.out, args.force)
    if args.input:
        cfg.inputs, cfg.mixture = list(args.input), None
    train_tokenizer(cfg, args.out, progress=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    from slmforge.tokenizer.importing import import_tokenizer
    from slmforge.tokenizer.tokenizer import load_tokenizer

    refuse_to_overwrite(args.out, args.force)
    out = import_tokenizer(args.src, args.out)
    print(f"imported {args.src} -> {out} ({load_tokenizer(out)!r})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from slmforge.tokenizer.report import format_table, tokenizer_report

    texts = {}
    for item in args.text:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise SlmforgeError(f"--text {item!r}: expected LANG=FILE, e.g. --text hi=hindi.txt")
        texts[lang] = path
    report = tokenizer_report(args.tokenizers, texts, args.out, args.max_lines)
    print(format_table(report))
    if args.out:
        print(f"wrote {args.out}/report.json, report.txt, report.png")
    return 0
