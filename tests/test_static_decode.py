"""The static decoding step (issue 17): one token per step with every shape fixed for the whole generation
(the whole preallocated cache, the position as a tensor), so that torch.compile traces it once. It gives
the states of the cached forward and the tokens of the cached path and of no cache at all, on a
llama-like model and a gemma3-like one whose sliding window is shorter than the context (rings
wrapped many times), batch 1 and 3, with and without left padding; compiled, it does not recompile
per token nor per generation length."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import random_decoder

from slmforge.inference import generate
from slmforge.inference.generate import SamplingConfig, generate_ids
from slmforge.models import build_model

WINDOW = 6
VOCAB = 97


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return random_decoder(request.param, VOCAB, WINDOW)


def greedy(max_new_tokens: int = 40, **fields) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, stop_at_eos=False, **fields)


@torch.no_grad()
@pytest.mark.parametrize("ring", [True, False])
def test_decode_step_gives_the_states_of_the_cached_forward(model, ring):
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    expected = model(ids)
    cache = model.new_cache(2, 40, ring=ring)  # 10 slots never written: masked
    outputs = [model(ids[:, :4], cache=cache)]
    position = torch.tensor(4)
    shapes = set()
    for t in range(4, 30):
        outputs.append(model.decode_step(ids[:, t:t + 1], cache, position))
        shapes.add(tuple(tuple(k.shape) for k in cache.keys))
        position += 1
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert len(shapes) == 1


@torch.no_grad()
def test_decode_step_with_ragged_left_padding(model):
    """Rows padded by different amounts, decoded past the window: each row gets what it gets alone, as
    the cached forward with attention_mask does."""
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (16, 11, 4)]
    width, steps = 16, 14
    ids = torch.zeros(3, width + steps, dtype=torch.long)
    mask = torch.zeros(3, width + steps, dtype=torch.long)
    continuation = torch.randint(0, VOCAB, (3, steps), generator=generator)
    for i, row in enumerate(rows):
        ids[i, width - len(row):width], mask[i, width - len(row):] = row, 1
        ids[i, width:] = continuation[i]
    cache = model.new_cache(3, width + steps)
    outputs = [model(ids[:, :width], mask[:, :width], cache=cache)]
    position = torch.tensor(width)
    for t in range(width, width + steps):
        outputs.append(model.decode_step(ids[:, t:t + 1], cache, position, key_padding=mask))
        position += 1
    hidden = torch.cat(outputs, dim=1)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, continuation[i]])[None])[0]
        torch.testing.assert_close(hidden[i, width - len(row):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_generation_equals_cached_and_uncached(model, batch):
    prompt = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(batch))
    cached = generate_ids(model, prompt, greedy())
    assert torch.equal(generate_ids(model, prompt, greedy(), use_cache=False), cached)
    for window_cache in (True, False):
        static = generate_ids(model, prompt, greedy(static_cache=True, window_cache=window_cache))
        assert torch.equal(static, cached), window_cache
    sampled = SamplingConfig(max_new_tokens=30, temperature=0.9, top_k=30, seed=2, stop_at_eos=False)
    assert torch.equal(generate_ids(model, prompt, dataclasses.replace(sampled, static_cache=True)),
                       generate_ids(model, prompt, sampled))


def test_static_generation_streams_and_stops_at_eos(model):
    prompt = torch.tensor([[1, 2]])
    plain = generate_ids(model, prompt, greedy(10))
    eos = int(plain[0, 4])  # pretend the 3rd generated token is eos
    seen = []
    out = generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0, static_cache=True),
                       eos_id=eos, on_token=seen.append)
    assert torch.equal(out, plain[:, :out.shape[1]]) and int(out[0, -1]) == eos
    assert seen == out[0, 2:-1].tolist()


def test_compiled_step_traces_once_for_every_token_and_length(model, monkeypatch):
    """Dynamo alone (no inductor: fast): the step is one graph without breaks (fullgraph), and two
    generations of different lengths trace it once, not once per token; the first new batch size
    traces it once more (dynamo then treats the batch as dynamic), a third none (batch 1 would:
    dynamo always specializes sizes 0 and 1)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(generate, "compiled_static_step",
                        lambda device_type: torch.compile(generate._static_step, backend=counter, fullgraph=True))
    monkeypatch.setattr(generate, "_static_caches", type(generate._static_caches)())
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = generate_ids(model, prompt, greedy(30))
    assert torch.equal(generate_ids(model, prompt, greedy(30, compile=True)), expected)
    assert torch.equal(generate_ids(model, prompt[:, :3], greedy(17, compile=True)),
                       generate_ids(model, prompt[:, :3], greedy(17)))
    assert counter.frame_count == 1
    for batch in (3, 5):
        rows = torch.randint(0, VOCAB, (batch, 4), generator=torch.Generator().manual_seed(batch))
        assert torch.equal(generate_ids(model, rows, greedy(12, compile=True)), generate_ids(model, rows, greedy(12)))
    assert counter.frame_count == 2
    torch._dynamo.reset()


@torch.no_grad()
def test_a_generation_started_inside_another_does_not_share_its_cache(model, monkeypatch):
    """compile=true keeps one cache per model between generations; a generation started while another
    runs (here from the streaming callback, as a second thread could) gets its own, and both give the
    tokens they give alone."""
    monkeypatch.setattr(generate, "compiled_static_step",
                        lambda device_type: torch.compile(generate._static_step, backend="eager", fullgraph=True))
    monkeypatch.setattr(generate, "_static_caches", type(generate._static_caches)())
    outer_prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    inner_prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    inner = []

    def generate_inside(token_id: int) -> None:
        if not inner:
            inner.append(generate_ids(model, inner_prompt, greedy(20, compile=True)))

    outer = generate_ids(model, outer_prompt, greedy(20, compile=True), on_token=generate_inside)
    assert torch.equal(outer, generate_ids(model, outer_prompt, greedy(20)))
    assert torch.equal(inner[0], generate_ids(model, inner_prompt, greedy(20)))
    assert not generate._caches_in_use  # both released
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_generation_equals_cached(model):
    """Inductor for real (about 10 s a compile on 2 CPU cores): the same tokens as the cached path,
    batch 1 and 3, ring and full caches, and one compile for two lengths in the same cache bucket."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 3):
        prompt = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(batch))
        for fields in (dict(), dict(window_cache=False)):
            assert torch.equal(generate_ids(model, prompt, greedy(40, compile=True, **fields)),
                               generate_ids(model, prompt, greedy(40, **fields))), (batch, fields)
    graphs = counters["stats"]["unique_graphs"]
    short = generate_ids(model, prompt[:, :2], greedy(9, compile=True))
    assert torch.equal(short, generate_ids(model, prompt[:, :2], greedy(9)))
    assert counters["stats"]["unique_graphs"] == graphs  # a new length, no new compile
    torch._dynamo.reset()


def test_encoder_decoder_ignores_the_static_switches():
    from slmforge.models import EncDecConfig

    model = build_model(EncDecConfig.from_name("t5-tiny", vocab_size=VOCAB), seed=0).eval()
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    assert torch.equal(generate_ids(model, ids, greedy(8, compile=True), eos_id=1),
                       generate_ids(model, ids, greedy(8), eos_id=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_equals_cached(model):
    """compile=true on CUDA: CUDA graphs (no skip: the cache's in-place writes are allowed because its
    buffers are static addresses), the tokens of the cached path, and no new compile for a second
    generation of another length."""
    import copy

    from torch._dynamo.utils import counters

    cuda = copy.deepcopy(model).cuda()
    torch._dynamo.reset()
    counters.clear()
    prompt = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(8)).cuda()
    for rows in (1, 3):
        assert torch.equal(generate_ids(cuda, prompt[:rows], greedy(40, compile=True)),
                           generate_ids(cuda, prompt[:rows], greedy(40))), rows
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(generate_ids(cuda, prompt[:, :3], greedy(21, compile=True)),
                       generate_ids(cuda, prompt[:, :3], greedy(21)))
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()
