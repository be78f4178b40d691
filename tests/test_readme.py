"""What users copy from the README and docs/ works: every TOML example validates under the verbs that
read it, every relative link leads somewhere, and the README stays short."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from slmforge import config
from slmforge.data.prepare import DataConfig
from slmforge.tokenizer import TokenizerConfig
from slmforge.train.config import PretrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^\s*```")
PRETRAIN_SECTIONS = {"model", "objective", "optim", "schedule", "train", "tracking", "parallel"}
FINETUNE_SECTIONS = {"finetune", "lora"}
DISTILL_SECTIONS = {"distill"}


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, re.S)


BLOCKS = [(_name(page), i, block) for page in PAGES
          for i, block in enumerate(_toml_blocks(page.read_text(encoding="utf-8")))]


def test_docs_have_toml_examples():
    assert len(BLOCKS) >= 8  # the README's eight examples, moved to docs/ (issue 24), none lost


@pytest.mark.parametrize("page,index,block", BLOCKS, ids=[f"{page}-block{i}" for page, i, _ in BLOCKS])
def test_toml_example_validates(page, index, block):
    tree = tomllib.loads(block)
    assert set(tree) <= set(config.RECIPE_SECTIONS), set(tree)
    if "curate" in tree:  # needs the `curate` extra's packages only to run, not to check its config
        from slmforge.curate.config import CurateConfig

        config.from_dict(CurateConfig, tree["curate"], "curate")
    if "tokenizer" in tree:
        config.from_dict(TokenizerConfig, tree["tokenizer"], "tokenizer")
    if "data" in tree:
        config.from_dict(DataConfig, tree["data"], "data")
    if "pairs" in tree:
        from slmforge.data.pairs import PairsConfig

        config.from_dict(PairsConfig, tree["pairs"], "pairs")
    # The training sections go to the verb that reads them, with the other verbs' sections left out
    # (as each verb skips them in a shared recipe file).
    training = {k: v for k, v in tree.items() if k in PRETRAIN_SECTIONS | FINETUNE_SECTIONS | DISTILL_SECTIONS}
    if set(tree) & FINETUNE_SECTIONS:
        from slmforge.finetune.config import FinetuneConfig

        config.from_dict(FinetuneConfig, training)
    elif set(tree) & DISTILL_SECTIONS:
        from slmforge.distill.config import DistillRunConfig

        config.from_dict(DistillRunConfig, training)
    elif set(tree) & PRETRAIN_SECTIONS:
        config.from_dict(PretrainConfig, training)


def test_readme_setup_commands_match_ci():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n`]*)", README).group(1)
    assert test_command.strip() in ci
    assert "torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci
    assert 'pip install -e ".[demo]" && slmforge quickstart' in README


@pytest.mark.parametrize("page", PAGES, ids=[_name(page) for page in PAGES])
def test_code_fences_are_closed(page):
    fences = [line for line in page.read_text(encoding="utf-8").splitlines() if FENCE.match(line)]
    assert len(fences) % 2 == 0, f"{_name(page)}: an unclosed code block"


def test_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= 300, len(README.splitlines())


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where brackets are not links)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def _anchors(text: str) -> set[str]:
    """GitHub's ids for the headings of a Markdown page."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6} +(.*?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


LINKS = [(_name(page), target) for page in PAGES
         for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8")))
         if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked


def test_pages_have_relative_links():
    assert {page for page, _ in LINKS} >= {"README.md", "docs/README.md"}


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{page}->{target}" for page, target in LINKS])
def test_relative_link_exists(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: link to {target}: {file} does not exist"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file.read_text(encoding="utf-8")), f"{page}: link to {target}: no such heading"


def test_readme_links_every_docs_page():
    linked = {target.partition("#")[0] for page, target in LINKS if page == "README.md"}
    index = {target.partition("#")[0] for page, target in LINKS if page == "docs/README.md"}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        if doc.name != "README.md":
            assert f"docs/{doc.name}" in linked, f"README.md does not link docs/{doc.name}"
            assert doc.name in index, f"docs/README.md does not link {doc.name}"
