"""What users copy from the README works: every TOML example validates under the verbs that read it."""

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

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)
PRETRAIN_SECTIONS = {"model", "objective", "optim", "schedule", "train", "tracking", "parallel"}


def test_readme_has_toml_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_toml_example_validates(block):
    tree = tomllib.loads(block)
    assert set(tree) <= {"tokenizer", "data", "curate"} | PRETRAIN_SECTIONS, set(tree)
    if "curate" in tree:  # needs the `curate` extra's packages only to run, not to check its config
        from slmforge.curate.config import CurateConfig

        config.from_dict(CurateConfig, tree["curate"], "curate")
    if "tokenizer" in tree:
        config.from_dict(TokenizerConfig, tree["tokenizer"], "tokenizer")
    if "data" in tree:
        config.from_dict(DataConfig, tree["data"], "data")
    if set(tree) & PRETRAIN_SECTIONS:
        config.from_dict(PretrainConfig, tree)


def test_readme_setup_commands_match_ci():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    test_command = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n`]*)", README).group(1)
    assert test_command.strip() in ci
    assert "torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci
    assert 'pip install -e ".[demo]" && slmforge quickstart' in README
