"""Every recipe in recipes/ is a valid config for each verb that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmforge import config
from slmforge.data.prepare import load_config as load_data_config
from slmforge.tokenizer import load_config as load_tokenizer_config
from slmforge.train.config import PretrainConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_sections_validate(recipe):
    tree = config.read_toml(recipe)
    pre = config.load(PretrainConfig, recipe)
    assert pre.train.data == tree["data"]["out"]  # train.data defaults to the recipe's data.out
    assert pre.train.seq_len <= pre.model.max_seq_len
    load_tokenizer_config(recipe)
    data = load_data_config(recipe)
    assert data.sources


def test_seed_003_recipe_is_the_gemma3_270m_shape_with_50k_vocabulary():
    pre = config.load(PretrainConfig, Path(__file__).parent.parent / "recipes" / "gemma3-270m-hindi.toml")
    m = pre.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == (18, 640, 4, 1, 256)
    assert (m.sliding_window, m.global_every, m.rope_local_theta, m.rope_theta) == (512, 6, 1e4, 1e6)
    assert m.vocab_size == 50_000 and m.tie_embeddings and m.activation == "gelu_tanh"
    assert (pre.optim.beta2, pre.optim.eps, pre.optim.weight_decay, pre.schedule.warmup_steps) == (0.95, 1e-9, 0.1, 8000)
    assert (pre.train.seq_len, pre.train.batch_size) == (1024, 48)
