"""Every `slmforge` command printed in the README and docs/ parses as printed: the verb exists, its flags
exist, the recipe it names exists and its `section.field=value` words validate against that recipe.

Running every printed command would train dozens of models; the recipes' small versions
(test_recipe_small_versions.py) and the quickstart tests run the ones that train. What goes stale
silently is the rest: a renamed flag, a moved recipe, a field that no longer exists. This test catches
those for every command in every page.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from slmforge import cli, config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
SEPARATORS = {"&&", "||", "|", ";"}
# Words a page shows as placeholders for the reader's own values.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|<[^>]+>|\$")


def _commands(text: str) -> list[list[str]]:
    """The `slmforge ...` commands of a page's shell blocks, as argv lists (continuations joined,
    comments and `$ ` prompts dropped, one command per `&&`/`|`/`;` segment)."""
    found = []
    for block in SHELL_BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if "slmforge" not in line:
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an unbalanced quote is a broken example too
                found.append(["<unparsable>", line])
                continue
            segment: list[str] = []
            for word in words + [";"]:
                if word in SEPARATORS:
                    if segment and segment[0] == "slmforge":
                        found.append(segment)
                    segment = []
                else:
                    segment.append(word)
    return found


COMMANDS = [(page.relative_to(ROOT).as_posix(), argv) for page in PAGES
            for argv in _commands(page.read_text(encoding="utf-8"))]


def test_pages_print_commands():
    assert len(COMMANDS) >= 40, len(COMMANDS)  # the README and docs/ show the pipeline's commands


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[f"{page}:{' '.join(argv[1:4])}" for page, argv in COMMANDS])
def test_printed_command_parses(page, argv, parser):
    check_command(page, argv, parser)


@pytest.mark.parametrize("line", [
    "slmforge pretrain -c recipes/llama-150m-de-en.toml --max-steps 5",   # a flag that does not exist
    "slmforge pretrain -c recipes/llama-150m-de-en.toml train.max_stepz=5",  # a misspelled field
    "slmforge pretrain -c recipes/no-such-recipe.toml",                    # a moved recipe
    "slmforge generat runs/x -p hi",                                       # a misspelled verb
    "slmforge generate runs/x -p hi tempreature=0",                        # a sampling field misspelled
])
def test_a_stale_command_is_caught(line, parser):
    (argv,) = _commands(f"```bash\n{line}\n```\n")
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_command("planted.md", argv, parser)


def check_command(page: str, argv: list[str], parser: argparse.ArgumentParser) -> None:
    assert argv[0] == "slmforge", f"{page}: {' '.join(argv)}"
    words = argv[1:]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args, extra = parser.parse_known_args(words)
        except SystemExit:
            pytest.fail(f"{page}: `{shlex.join(argv)}` does not parse: {stderr.getvalue().strip()}")
    if hasattr(args, "overrides"):
        cli._collect_overrides(args)
        extra = [w for w in extra if not config_word(w)]
        args.overrides = list(args.overrides or []) + [w for w in words if config_word(w)
                                                         and w not in (args.overrides or [])]
    assert not extra, f"{page}: `{shlex.join(argv)}`: unrecognized arguments {extra}"
    assert args.verb, f"{page}: `{shlex.join(argv)}` names no verb"
    recipe = getattr(args, "config", None)
    if recipe and recipe.startswith("recipes/"):  # one of ours (others are the reader's own files)
        assert (ROOT / recipe).is_file(), f"{page}: `{shlex.join(argv)}`: the recipe {recipe} does not exist"
    _check_fields(page, argv, args, recipe)


def config_word(word: str) -> bool:
    """What `slmforge` takes as a `field=value` override where argparse left it over (cli._main)."""
    return "=" in word and not word.startswith("-")


def _check_fields(page: str, argv: list[str], args: argparse.Namespace, recipe: str | None) -> None:
    """The command's `section.field=value` words name fields of its verb's config; a training verb's
    recipe loads with them."""
    overrides = [w for w in (getattr(args, "overrides", None) or []) if not PLACEHOLDER.search(w.partition("=")[0])]
    line = f" {shlex.join(argv[1:])} "
    verb = next((name for name in sorted(cli.VERB_CONFIGS, key=len, reverse=True) if f" {name} " in line), None)
    if verb is None:
        assert not overrides, f"{page}: `{shlex.join(argv)}`: {overrides} given to a verb without config fields"
        return
    fields = set(cli._config_fields(verb))
    for word in overrides:
        key = word.partition("=")[0]
        known = key in fields or any(f.startswith(key + ".") or key.startswith(f + ".") for f in fields)
        assert known, f"{page}: `{shlex.join(argv)}`: {key} is not a field of `slmforge {verb}`"
    module, name, section = cli.VERB_CONFIGS[verb]
    path = ROOT / recipe if recipe and (ROOT / recipe).is_file() else None
    if section or path is None:
        return
    cls = getattr(__import__(module, fromlist=[name]), name)
    try:
        config.load_recipe(cls, path, overrides)
    except Exception as e:  # noqa: BLE001 - the message names the field
        pytest.fail(f"{page}: `{shlex.join(argv)}`: {e}")


# ---------------------------------------------------------------- Python examples

PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PYTHON = [(page.relative_to(ROOT).as_posix(), i, block) for page in PAGES
          for i, block in enumerate(PYTHON_BLOCK.findall(page.read_text(encoding="utf-8")))]


def stale_imports(source: str) -> list[str]:
    """The names a Python example imports that do not exist (a moved module, a renamed function)."""
    import ast
    import importlib

    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "slmforge":
                    try:
                        importlib.import_module(alias.name)
                    except ImportError:
                        missing.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "slmforge":
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                missing.append(node.module)
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name}")
    return missing


def test_pages_show_python_examples():
    assert len(PYTHON) >= 8, len(PYTHON)


@pytest.mark.parametrize("page,index,block", PYTHON, ids=[f"{page}-python{i}" for page, i, _ in PYTHON])
def test_python_example_compiles_and_its_slmforge_imports_exist(page, index, block):
    compile(block, f"{page} python block {index}", "exec")  # a syntax error in an example fails here
    assert not stale_imports(block), f"{page} python block {index} imports what does not exist: {stale_imports(block)}"


def test_a_stale_python_import_is_caught():
    assert stale_imports("from slmforge.runs import open_run\nimport slmforge.generate\n") == \
        ["slmforge.runs", "slmforge.generate"]
    assert stale_imports("from slmforge.checkpoint.reading import open_run, no_such_name\n") == \
        ["slmforge.checkpoint.reading.no_such_name"]
    assert stale_imports("from slmforge.checkpoint.reading import open_run\nimport json\n") == []
