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

from slmforge.arguments import OVERRIDE, HelpFormatter, add_config_arguments  # noqa: F401 (older imports)
from slmforge.errors import SlmforgeError

# Modules that contribute verbs (each `<package>.commands` with `register(sub)`), in the order `--help`
# lists them (pipeline order).
COMMAND_MODULES = [
    "slmforge.quickstart.commands",
    "slmforge.tokenizer.commands",
    "slmforge.data.commands",
    "slmforge.train.commands",
    "slmforge.distill.commands",
    "slmforge.finetune.commands",
    "slmforge.eval.commands",
    "slmforge.inference.commands",
    "slmforge.interop.commands",
    "slmforge.serve.commands",
    "slmforge.report.commands",
]


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


# ---------------------------------------------------------------- unknown flags

# The config of each verb that takes `key.sub=value` words: (module, class, section prefix). A flag
# such as `--max-steps 5` is looked up among its fields, to suggest `train.max_steps=5`.
VERB_CONFIGS = {
    "pretrain": ("slmforge.train.config", "PretrainConfig", ""),
    "finetune": ("slmforge.finetune.config", "FinetuneConfig", ""),
    "distill": ("slmforge.distill.config", "DistillRunConfig", ""),
    "tokenizer train": ("slmforge.tokenizer.config", "TokenizerConfig", "tokenizer"),
    "data prepare": ("slmforge.data.prepare", "DataConfig", "data"),
    "data curate": ("slmforge.curate.config", "CurateConfig", "curate"),
    "data pairs": ("slmforge.data.pairs", "PairsConfig", "pairs"),
    "generate": ("slmforge.inference.generate", "SamplingConfig", ""),
}


def verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb the command line named (`data prepare` -> its own), else `parser`."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if name not in getattr(action, "choices", {}):
            return parser
        parser = action.choices[name]


def unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, words: list[str],
                 extra: list[str]) -> None:
    """Refuse words argparse did not take, with the usage of the verb they followed and, for a
    misspelled flag, the flag or config field probably meant (`--promt` -> --prompt, `--max-steps 5`
    -> train.max_steps=5). Exits with status 2, as argparse does."""
    target = verb_parser(parser, args)
    verb_at = next((i for i, w in enumerate(words) if not w.startswith("-")), len(words))
    first = next((i for i, w in enumerate(words) if w == extra[0]), len(words))
    if first < verb_at:  # `slmforge --bogus pretrain`: a flag of the top level
        target = parser
    shown, values, pending = [], {}, list(extra)
    for i, word in enumerate(words):
        if word not in pending:
            continue
        pending.remove(word)
        shown.append(word)
        flag, given, value = word.partition("=")
        following = words[i + 1] if i + 1 < len(words) else "-"
        if not word.startswith("-"):
            continue
        if given:
            values[flag] = value
        elif i + 1 != verb_at and not following.startswith("-") and "=" not in following:
            values[flag] = following
            if following not in pending:  # argparse took it for a positional word: it was this flag's value
                shown.append(following)
    shown += pending
    flag = next((w.partition("=")[0] for w in extra if w.startswith("-") and w != "-"), None)
    hint = None
    if flag and target is not parser:
        top = [o for a in parser._actions for o in a.option_strings]
        verb = target.prog.removeprefix(parser.prog).strip()
        hint = f"{parser.prog} {flag} {verb} ..." if flag in top else _suggestion(target, flag, values.get(flag))
    message = f"unrecognized arguments: {' '.join(shown)}"
    target.error(f"{message}; did you mean {hint}?" if hint else message)


def _suggestion(target: argparse.ArgumentParser, flag: str, value: str | None) -> str | None:
    """The verb's option closest to `flag`, or the config field it names (`--max-steps` -> train.max_steps)."""
    import difflib

    options = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    name = flag.lstrip("-").replace("-", "_")
    fields = _config_fields(target.prog.removeprefix("slmforge").strip())
    named = [f for f in fields if f.rsplit(".", 1)[-1] == name]
    if not named:
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
        if close:
            return close[0]
        by_leaf = {f.rsplit(".", 1)[-1]: f for f in reversed(fields)}
        named = [by_leaf[leaf] for leaf in difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.8)]
    if not named:
        return None
    import shlex

    shown = "VALUE" if value is None else shlex.quote(value)  # as typed in a shell: '["a.jsonl"]'
    return " or ".join(f"{field}={shown}" for field in named[:3])


def _config_fields(verb: str) -> list[str]:
    """Every `section.field` name of `verb`'s config, in `--show-fields` order, each once ([] for a
    verb without one)."""
    if verb not in VERB_CONFIGS:
        return []
    from slmforge.config import describe

    module, name, section = VERB_CONFIGS[verb]
    cls = getattr(importlib.import_module(module), name)
    names = [m.group(1) for line in describe(cls, section) if (m := re.match(r"\s+([\w.\[\]]+) \(", line))]
    return list(dict.fromkeys(names))


# Verbs that train: their stop signals are answered from the start (train/signals.py), before the
# verbs' modules are imported for the parser (seconds: torch), so that a SIGTERM then stops in one line.
TRAINING_VERBS = ("pretrain", "finetune", "distill")


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    verb = next((word for word in words if not word.startswith("-")), None)  # the top level has flags only
    if verb not in TRAINING_VERBS:
        return _main(argv)
    from slmforge.train.signals import verb_signals

    try:
        with verb_signals():
            return _main(argv)
    except KeyboardInterrupt as e:  # while the parser imported the verbs, or after the run had finished
        return _stopped(e)


def _stopped(e: KeyboardInterrupt) -> int:
    """A training run stopped by a signal has said so when it saved (rank 0); other stops are said here."""
    if not getattr(e, "said", False):
        print(f"slmforge: {str(e) or 'interrupted'}", file=sys.stderr)
    from slmforge.train.signals import end_if_orphaned

    code = getattr(e, "exit_code", 130)
    end_if_orphaned(code)  # a torchrun worker whose launcher died ends here, without torch's teardown
    return code


def _main(argv: list[str] | None) -> int:
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
        unrecognized(parser, args, sys.argv[1:] if argv is None else argv, extra)
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
        return _stopped(e)
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
