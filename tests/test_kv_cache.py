"""Sliding-window layers keep a window-sized ring of keys/values (issue 17 (c)): decoding with it gives
the same logits and tokens as the full cache and as no cache at all, and as transformers' Gemma 3."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import randomize_weights

from slmforge.inference.generate import SamplingConfig, generate_ids
from slmforge.models import DecoderConfig, build_model

WINDOW = 6


@pytest.fixture(scope="module")
def model():
    cfg = DecoderConfig.from_name("gemma3-tiny", vocab_size=97, hidden_size=64, num_layers=4, num_heads=4,
                                  num_kv_heads=2, head_dim=16, intermediate_size=96, sliding_window=WINDOW,
                                  global_every=2, query_pre_attn_scalar=16.0, max_seq_len=64)
    model = build_model(cfg, seed=0).eval()
    randomize_weights(model, seed=1)
    return model


def test_ring_layers_hold_only_the_window(model):
    cache = model.new_cache(3, 50)
    sliding = [block.sliding for block in model.layers]
    assert sliding == [True, False, True, False]
    for layer, is_sliding in enumerate(sliding):
        assert cache.keys[layer].shape == (3, 2, WINDOW if is_sliding else 50, 16)
    full = model.new_cache(3, 50, ring=False)
    assert all(k.shape[2] == 50 for k in full.keys)
    short = model.new_cache(1, WINDOW)  # the window covers the whole cache: nothing to ring
    assert short.window is None and all(k.shape[2] == WINDOW for k in short.keys)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[3] + [1] * 27, [9] + [1] * 21, [2, 5, 1, 7, 1, 1, 13]])
def test_ring_logits_equal_uncached_and_full_cache(model, chunks):
    """Prefill shorter and longer than the window, then single tokens and chunks (some longer than
    the window) on top of a wrapped ring."""
    ids = torch.randint(0, 97, (2, sum(chunks)), generator=torch.Generator().manual_seed(3))
    expected = model(ids)
    for ring in (True, False):
        cache = model.new_cache(2, ids.shape[1], ring=ring)
        outputs, start = [], 0
        for size in chunks:
            outputs.append(model(ids[:, start:start + size], cache=cache))
            start += size
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ring_with_left_padding_matches_unpadded(model):
    row = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(4))
    pad = 5
    ids = torch.cat([torch.zeros(pad, dtype=torch.long), row])[None]
    mask = torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(20, dtype=torch.long)])[None]
    cache = model.new_cache(1, 25)
    outputs = [model(ids[:, :10], mask[:, :10], cache=cache)]
    for t in range(10, 25):
        outputs.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
    alone = model(row[None])
    torch.testing.assert_close(torch.cat(outputs, 1)[0, pad:], alone[0], atol=1e-5, rtol=1e-5)


def test_generation_is_the_same_with_ring_full_and_no_cache(model, monkeypatch):
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=20, seed=3, stop_at_eos=False)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    ring = generate_ids(model, prompt, cfg)
    uncached = generate_ids(model, prompt, cfg, use_cache=False)
    full = generate_ids(model, prompt, dataclasses.replace(cfg, window_cache=False))
    assert torch.equal(ring, uncached) and torch.equal(ring, full)
    assert [cache.window for cache in caches] == [WINDOW, None]  # the config switch reached the cache


@torch.no_grad()
def test_ring_decoding_matches_transformers_gemma3_past_the_window(model):
    transformers = pytest.importorskip("transformers")
    from slmforge.models.hf import config_to_hf, state_dict_to_hf

    config = transformers.AutoConfig.for_model(**config_to_hf(model.cfg))
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    theirs.load_state_dict(state_dict_to_hf(model.cfg, model.state_dict()), strict=False)
    prompt = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    ours = generate_ids(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0, stop_at_eos=False))
    generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=40, min_new_tokens=40,
                                               eos_token_id=None, pad_token_id=0)
    hf = theirs.generate(prompt, generation_config=generation, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, hf)


@torch.no_grad()
def test_ring_with_ragged_left_padding_past_the_window(model):
    """Rows padded by different amounts, decoded well past the window: every row gets what it gets alone."""
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 97, (n,), generator=generator) for n in (16, 11, 4)]
    width, steps = 16, 14
    ids = torch.zeros(3, width + steps, dtype=torch.long)
    mask = torch.zeros(3, width + steps, dtype=torch.long)
    continuation = torch.randint(0, 97, (3, steps), generator=generator)
    for i, row in enumerate(rows):
        ids[i, width - len(row):width], mask[i, width - len(row):] = row, 1
        ids[i, width:] = continuation[i]
    cache = model.new_cache(3, width + steps)
    outputs = [model(ids[:, :width], mask[:, :width], cache=cache)]
    for t in range(width, width + steps):
        outputs.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
    hidden = torch.cat(outputs, dim=1)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, continuation[i]])[None])[0]
        torch.testing.assert_close(hidden[i, width - len(row):], alone, atol=1e-5, rtol=1e-5)
