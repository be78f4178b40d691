"""Config loading: every bad field fails before any work, in one line naming the field."""

from __future__ import annotations

import pytest

from slmforge import config
from slmforge.errors import ConfigError
from slmforge.models import DecoderConfig
from slmforge.train.config import PretrainConfig


def load(*overrides: str, path=None) -> PretrainConfig:
    return config.load(PretrainConfig, path, list(overrides))


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "model.hiden_size: unknown field"),
    ("train.max_steps=ten", "train.max_steps: expected int, got 'ten'"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("train.compile=3", "train.compile: expected bool"),
    ("model.num_kv_heads=3", "model.num_kv_heads: must divide num_heads (8), got 3"),
    ("model.num_heads=3", "model.num_kv_heads: must divide num_heads (3), got 8"),
    ("model.activation=relu", "model.activation: must be one of 'silu' | 'gelu_tanh'"),
    ("model.preset=gpt5", "model.preset: unknown preset 'gpt5'"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio: must be in [0, 1]"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("train.seq_len=4096", "train.seq_len: must be <= model.max_seq_len (1024)"),
    ("tracking.backends=['neptune']", "tracking.backends[0]: must be one of wandb"),
    ("nosuch.x=1", "nosuch: unknown field"),
])
def test_bad_fields_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_heads_must_divide_hidden_size_without_explicit_head_dim():
    with pytest.raises(ConfigError, match="model.num_heads: must divide hidden_size"):
        config.from_dict(DecoderConfig, {"hidden_size": 100, "num_heads": 8, "num_kv_heads": 8}, "model")
    # an explicit head_dim (Gemma 3 270M: 4 heads of 256 at hidden 640) is allowed
    cfg = config.from_dict(DecoderConfig, {"hidden_size": 640, "num_heads": 4, "num_kv_heads": 1,
                                         "head_dim": 256}, "model")
    assert cfg.head_dim == 256


def test_preset_fields_and_overrides_merge(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gemma3-270m"\nvocab_size = 50000\n\n[train]\nmax_steps = 7\n')
    cfg = load("train.max_steps=9", "model.max_seq_len=1024", path=path)
    assert cfg.model.num_layers == 18 and cfg.model.head_dim == 256 and cfg.model.sliding_window == 512
    assert cfg.model.vocab_size == 50000 and cfg.model.max_seq_len == 1024
    assert cfg.train.max_steps == 9  # command line beats file


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load("model.preset=gemma3-tiny", "optim.lr=0.001", "tracking.backends=['wandb']")
    config.save(cfg, tmp_path / "config.toml")
    again = config.load(PretrainConfig, tmp_path / "config.toml")
    assert again == cfg


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(path=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load(path=bad)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[train]\nout_dir = 'r\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml: not UTF-8"):
        load(path=latin1)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\nnum_layers = 'deep'\n")
    with pytest.raises(ConfigError, match="wrong.toml: model.num_layers: expected int"):
        load(path=wrong)


def test_override_syntax():
    assert config.parse_override("a.b=3") == (["a", "b"], 3)
    assert config.parse_override("a=runs/x y") == (["a"], "runs/x y")
    assert config.parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        config.parse_override("novalue")


def test_help_lists_documented_fields():
    lines = config.describe(PretrainConfig)
    assert any(line.startswith("  model.sliding_window (int | none") and "sliding-window" in line for line in lines)
    assert any("train.grad_accum" in line and "Micro-batches" in line for line in lines)
