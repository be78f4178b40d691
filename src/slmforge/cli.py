"""The `slmforge` command: verbs that mirror the pipeline, each a few lines calling one function.

Each area of the package owns its verbs in a `commands.py` with `register(subparsers)`; this file only
assembles them and turns a `SlmforgeError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import re
import sys

from slmforge.errors import SlmforgeError

# Modules that contribute verbs, in the order `--help` lists them (pipeline order).
COMMAND_MODULES = [
    "slmforge.quickstart",
    "slmforge.tokenizer.commands",
    "slmforge.data.commands",
    "slmforge.train.commands",
    "slmforge.distill.commands",
    "slmforge.finetune.commands",
    "slmforge.eval.commands",
    "slmforge.generate",
    "slmforge.translate",
    "slmforge.fill_mask",
    "slmforge.interop.commands",
    "slmforge.report.commands",
]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmforge",
        description="slmforge: raw text in any language -> tokenizer -> token shards -> "
                    "trained small language model -> eval, generate, export.",
        epilog="Run `slmforge VERB --help` for a verb's arguments. Start with `slmforge quickstart`.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress or status lines (warnings and errors still show); results still print")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _collect_overrides(args: argparse.Namespace) -> None:
    """`--input a.txt b.txt tokenizer.vocab_size=500` puts the override into --input's list (nargs="+"
    takes every word up to the next option); move `section.field=value` words that name no existing
    file back to the overrides."""
    import os

    value = getattr(args, "input", None)
    if isinstance(value, list):
        moved = [v for v in value if OVERRIDE.match(v) and not os.path.exists(v)]
        if moved:
            args.input = [v for v in value if v not in moved] or None
            args.overrides = list(args.overrides or []) + moved


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="slmforge: warning: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        _collect_overrides(args)
    # argparse binds all positionals at their first run, so `key=value` overrides placed after an
    # option (`generate RUN -p hi temperature=0.7`) arrive here; they are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.quiet:  # read by formatting.say and the progress displays, also in worker processes
        import os

        os.environ["SLMFORGE_QUIET"] = "1"
    try:
        result = args.func(args)
    except SlmforgeError as e:
        print(f"slmforge: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `slmforge ... | head`: the reader left; stop quietly (Python's documented way: point stdout
        # at /dev/null so the interpreter's final flush does not fail again).
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no real file (captured)
            pass
        return 141
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"slmforge: error: disk full writing {e.filename or 'a file'}; free space and run the same "
              f"command again (finished work is kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # A training run stopped by a signal has saved and said so (rank 0); a bare Ctrl-C elsewhere has not.
        if not getattr(e, "said", False):
            print(f"slmforge: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except RuntimeError as e:
        lost = lost_peer(e)
        if lost is None:
            raise
        print(f"slmforge: error: {lost}", file=sys.stderr)
        return 1
    return int(result or 0)


# What torch's collectives say when the process at the other end is gone (killed, or stopped by its
# own error): gloo's and NCCL's wording, and the DistError types of recent torch.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "Socket Timeout", "Timed out", "timed out")


def lost_peer(error: BaseException) -> str | None:
    """One line for a process of a torchrun/srun job whose peers went away, or None for other errors:
    the traceback of a collective that lost its other end says nothing the failing rank's own error
    does not say better."""
    import os

    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world < 2:
        return None
    import torch.distributed as dist

    text = str(error)
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(error, dist_error) or any(marker in text for marker in _PEER_LOST)):
        return None
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "?"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return (f"rank {rank}: lost contact with the other processes ({first[:160]}); another rank failed or was "
            f"stopped, and its own message says why; the newest intact checkpoint is kept: run the same "
            f"command to resume")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
