"""The argparse pieces every verb's parser shares (below the verbs, which import them, and below
`cli`, which assembles the verbs): the help formatter, the config arguments, the override pattern."""

from __future__ import annotations

import argparse
import re


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


# `section.field=value` (a dotted key): an override wherever it stands on the command line.
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+=")


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The config arguments every config-driven verb shares; `example` shows overrides of its own
    sections (e.g. "tokenizer.vocab_size=16000")."""
    parser.add_argument("--config", "-c", help="TOML config file (sections as in `--show-fields`)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"override any config field, e.g. {example} (anywhere on the line, also "
                             f"after a list of files)")
    parser.add_argument("--show-fields", action="store_true",
                        help="list every config field with its type, default and meaning, then exit")
