"""Decoder invariants: cached == uncached, sliding-window masks, checkpoints, fused loss parity."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.checkpoint.reading import load_model, resolve_checkpoint
from slmforge.checkpoint.writing import save_checkpoint
from slmforge.errors import SlmforgeError
from slmforge.models import DecoderConfig, build_model
from slmforge.models.layers import causal_mask
from slmforge.objectives.losses import linear_cross_entropy, reference_cross_entropy


def logits(model, ids, cache=None):
    return model.logits(model(ids, cache=cache))


def tiny(family: str, **kw) -> DecoderConfig:
    if family == "gemma3":
        base = dict(sliding_window=6, global_every=2, max_seq_len=64, vocab_size=97, final_logit_softcap=30.0)
        return DecoderConfig.from_name("gemma3-tiny", **{**base, **kw})
    return DecoderConfig.from_name("llama-tiny", **{"vocab_size": 97, "max_seq_len": 64, "tie_embeddings": False,
                                                  "rope_scaling": "llama3", "rope_scaling_factor": 4.0,
                                                  "rope_original_max_seq_len": 16, **kw})


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_cache_gives_the_same_logits(family):
    torch.manual_seed(0)
    model = build_model(tiny(family), seed=0).eval()
    ids = torch.randint(0, 97, (2, 30))  # longer than the sliding window (6)
    full = logits(model, ids)
    cache = model.new_cache(2, 40)
    pieces = [logits(model, ids[:, :11], cache)]  # a prompt, then one token at a time, then a chunk
    pieces += [logits(model, ids[:, t:t + 1], cache) for t in range(11, 20)]
    pieces.append(logits(model, ids[:, 20:], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_attention_mask_matches_brute_force():
    for q_len, start, window in [(7, 0, None), (1, 9, None), (4, 5, None), (8, 0, 3), (1, 10, 4), (3, 6, 4),
                                 (5, 0, 16)]:
        mask = causal_mask(q_len, start, window, torch.device("cpu"))
        expected = torch.zeros(q_len, start + q_len, dtype=torch.bool)
        for i in range(q_len):
            for j in range(start + q_len):
                expected[i, j] = j <= start + i and (window is None or start + i - j < window)
        if mask is None:  # None means SDPA's causal (no prefix) or full (single query) attention is exact
            mask = torch.ones_like(expected) if q_len == 1 else torch.ones_like(expected).tril(start)
        assert torch.equal(mask, expected), (q_len, start, window)


def test_sliding_window_limits_what_a_local_layer_sees():
    """Changing a token outside every window leaves later logits unchanged only when all layers are local."""
    cfg = tiny("gemma3", global_every=1000, num_layers=2)  # both layers local, window 6
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    a, b = logits(model, ids), logits(model, changed)
    # two local layers of window 6 see at most 10 tokens back: position 11+ is unaffected by position 0
    torch.testing.assert_close(a[0, 11:], b[0, 11:])
    assert not torch.allclose(a[0, 5], b[0, 5])


def test_build_is_seeded():
    cfg = tiny("llama")
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, family):
    model = build_model(tiny(family), seed=1)
    folder = save_checkpoint(tmp_path / "run", 12, model, extra_meta={"note": "x"})
    assert folder.name == "step-000012"
    loaded, step_dir, meta = load_model(tmp_path / "run")
    assert step_dir == folder and meta["step"] == 12 and meta["note"] == "x"
    ids = torch.randint(0, 97, (2, 25))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert loaded.cfg == model.cfg


def test_checkpoints_never_overwrite_and_prune_oldest(tmp_path):
    model = build_model(tiny("llama"), seed=1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000003", "step-000004"]
    assert resolve_checkpoint(tmp_path).name == "step-000004"


def test_corrupt_or_mismatched_checkpoint_is_one_clear_error(tmp_path):
    model = build_model(tiny("llama"), seed=1)
    folder = save_checkpoint(tmp_path, 1, model)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100])
    with pytest.raises(SlmforgeError, match=r"model.safetensors has 100 bytes, [\d,]+ were written: the checkpoint "
                                            r"is damaged"):
        load_model(tmp_path)  # the checksums tell first
    (folder / "checksums.json").unlink()  # without them (an older folder, or one made by hand)
    with pytest.raises(SlmforgeError, match="model.safetensors: cannot read weights"):
        load_model(tmp_path)
    weights.write_bytes(original)
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"]["intermediate_size"] = 999
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SlmforgeError, match=r"tensor layers\.0\.mlp\.gate_proj\.weight has shape"):
        load_model(tmp_path)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(SlmforgeError, match="meta.json: corrupt"):
        load_model(tmp_path)
    with pytest.raises(SlmforgeError, match="no such run or checkpoint folder"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("softcap,with_bias", [(None, False), (5.0, False), (None, True)])
def test_linear_cross_entropy_matches_reference(softcap, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 40, (3, 13))
    targets[0, :4] = -100  # e.g. a prompt in fine-tuning
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    loss, correct = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=5, bias=bias,
                                         with_correct=True)
    grads = torch.autograd.grad(loss, inputs)
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    valid = targets != -100
    assert int(correct) == int(((logits.argmax(-1) == targets) & valid).sum())
    assert reference_cross_entropy(logits.detach(), targets).item() == pytest.approx(ref.item())


def test_gemma3_270m_shape():
    cfg = DecoderConfig.from_name("gemma3-270m")
    assert [cfg.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert cfg.head_dim == 256 and cfg.num_kv_heads == 1 and cfg.tie_embeddings
    assert 265e6 < cfg.num_parameters() < 271e6  # google/gemma-3-270m: 268M


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_gives_each_row_its_unpadded_result(family, side):
    """A ragged batch (eval, fine-tuning, distillation) padded on either side gives every row the hidden
    states it has alone: positions count real tokens only and padding is never attended to."""
    model = build_model(tiny(family), seed=0).eval()
    lengths = [30, 17, 9]
    rows = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), 30, dtype=torch.long)
    mask = torch.zeros(len(rows), 30, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(30 - len(row), 30)
        ids[i, span], mask[i, span] = row, 1
    hidden = model(ids, mask)
    assert torch.isfinite(hidden).all()  # padding rows see themselves, never an empty softmax
    for i, row in enumerate(rows):
        alone = model(row[None])[0]
        span = slice(0, len(row)) if side == "right" else slice(30 - len(row), 30)
        torch.testing.assert_close(hidden[i, span], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_cached_decoding_matches_unpadded():
    model = build_model(tiny("gemma3"), seed=0).eval()
    row = torch.randint(0, 97, (12,))
    ids = torch.cat([torch.zeros(5, dtype=torch.long), row])[None]
    mask = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(12, dtype=torch.long)])[None]
    cache = model.new_cache(1, 20)
    prompt = model(ids[:, :14], mask[:, :14], cache=cache)
    step = model(ids[:, 14:], mask, cache=cache)
    alone = model(row[None])
    torch.testing.assert_close(torch.cat([prompt, step], 1)[0, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_bias_only_gradient_with_softcap():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 20, (7,))
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, softcap=3.0, bias=bias), bias)
    logits = torch.tanh((hidden @ weight.t() + bias) / 3.0) * 3.0
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), bias)
    torch.testing.assert_close(grad, expected)
