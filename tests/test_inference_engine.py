"""The inference engine: a batch of prompts of different lengths gives every prompt the tokens it gets
alone (left padding, rows joining mid-run, the buffer shifting), on a llama-like model and a gemma3-like
one whose sliding window is shorter than the context; per-row stops and budgets; continuous batching
with requests that join late and are cancelled; engines own their caches."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_decoder

from slmforge.errors import SlmforgeError
from slmforge.inference import Engine, SamplingParams

VOCAB = 97
WINDOW = 6
LENGTHS = (3, 9, 1, 14, 6)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return random_decoder(request.param, VOCAB, WINDOW)


def prompts(lengths=LENGTHS, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


GREEDY = SamplingParams(max_new_tokens=20, stop_at_eos=False)
SAMPLED = SamplingParams(max_new_tokens=20, stop_at_eos=False, temperature=1.0, top_k=40, seed=5)


def alone(model, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return Engine(model, max_batch=1).generate([prompt], params)[0].token_ids


def spy_shifts(monkeypatch) -> list[int]:
    shifts = []
    shift = Engine._shift
    monkeypatch.setattr(Engine, "_shift", lambda self, d: shifts.append(d) or shift(self, d))
    return shifts


@torch.no_grad()
@pytest.mark.parametrize("options", [dict(), dict(static_cache=True), dict(window_cache=False)],
                         ids=["cached", "static", "full-cache"])
def test_mixed_lengths_in_one_batch_give_each_prompt_its_tokens_alone(model, options, monkeypatch):
    """5 prompts of 1-14 tokens, 3 slots and a 40-column buffer: rows are left-padded, later prompts join
    as others end, and the buffer shifts both ways; every prompt gets exactly its greedy tokens alone
    (on its own budget)."""
    shifts = spy_shifts(monkeypatch)
    batch = prompts((3, 1, 6, 14, 9))  # the 14-token prompt joins at column ~10: the rows shift right;
    expected = [alone(model, p) for p in batch]  # the last one runs into column 40: they shift left
    budgets = [SamplingParams(max_new_tokens=n, stop_at_eos=False) for n in (20, 5, 20, 10, 20)]
    got = Engine(model, max_batch=3, max_len=40, **options).generate(batch, budgets)
    assert [c.token_ids for c in got] == [e[:b.max_new_tokens] for e, b in zip(expected, budgets)]
    assert [c.finish_reason for c in got] == ["length"] * 5
    assert [(c.prompt_tokens, c.completion_tokens) for c in got] == [(len(p), b.max_new_tokens)
                                                                       for p, b in zip(batch, budgets)]
    assert any(d > 0 for d in shifts) and any(d < 0 for d in shifts)  # both ways exercised


@torch.no_grad()
def test_seeded_samples_do_not_depend_on_the_batch(model):
    """Every row draws from its own generator: a seeded request samples the same tokens alone and in a
    batch with others (and another seed gives other tokens)."""
    batch = prompts()
    expected = [alone(model, p, SAMPLED) for p in batch]
    assert [c.token_ids for c in Engine(model, max_batch=3).generate(batch, SAMPLED)] == expected
    assert alone(model, batch[0], SamplingParams(**{**SAMPLED.__dict__, "seed": 6})) != expected[0]


@torch.no_grad()
def test_per_row_stop_tokens_and_uncached_reference(model):
    batch = prompts()
    expected = [alone(model, p) for p in batch]
    stop = expected[1][3]  # row 1 stops at its 4th token; the others run on
    params = [GREEDY, SamplingParams(max_new_tokens=20, stop_token_ids=[stop]), GREEDY, GREEDY, GREEDY]
    got = Engine(model, max_batch=5).generate(batch, params)
    first = expected[1].index(stop)
    assert got[1].token_ids == expected[1][:first + 1] and got[1].finish_reason == "stop"
    assert [c.token_ids for i, c in enumerate(got) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
    plain = Engine(model, max_batch=5, use_cache=False).generate(batch, GREEDY)  # no cache at all
    assert [c.token_ids for c in plain] == expected


@torch.no_grad()
def test_continuous_batching_equals_each_request_alone(model, monkeypatch):
    """Requests join a running batch at different steps (from the engine thread's callbacks, so the
    moment is exact), with different lengths and samplers; one is cancelled mid-way. Each finished one
    gets the tokens it gets alone; the cancelled one a prefix of them, and a final "cancelled" event."""
    shifts = spy_shifts(monkeypatch)
    batch = prompts((5, 12, 2, 9, 7), seed=4)
    params = [GREEDY, SAMPLED, GREEDY, SamplingParams(max_new_tokens=8, stop_at_eos=False), GREEDY]
    expected = [alone(model, p, q) for p, q in zip(batch, params)]
    engine = Engine(model, max_batch=3, max_len=40)
    engine.start()
    events: dict[int, list] = {}
    requests = {}
    lock = threading.Lock()

    def on_event(event):
        with lock:
            events.setdefault(event.request_id, []).append(event)
            count = len(events[event.request_id])
        if event.request_id == requests[0].id and count in (3, 6, 9):  # requests 1, 2, 3 join at steps 3, 6, 9
            k = (3, 6, 9).index(count) + 1
            requests[k] = engine.submit(batch[k], params[k], on_event=on_event)
        if event.request_id == requests[0].id and count == 4:
            requests[4] = engine.submit(batch[4], params[4])  # read through events()
        if k_is(event, 2) and count == 4:
            requests[2].cancel()

    def k_is(event, k):
        return k in requests and event.request_id == requests[k].id

    with lock:
        requests[0] = engine.submit(batch[0], params[0], on_event=on_event)
    for k in range(4):
        while k not in requests:
            threading.Event().wait(0.01)
        assert requests[k].done.wait(60)
    streamed = list(requests[4].events())
    engine.close()
    for k in (0, 1, 3):
        tokens = [e.token_id for e in events[requests[k].id]]
        assert tokens == expected[k], k
        assert events[requests[k].id][-1].finish_reason == "length"
        assert requests[k].completion.token_ids == expected[k]
    cancelled = events[requests[2].id]
    assert cancelled[-1].finish_reason == "cancelled" and cancelled[-1].token_id is None
    tokens = [e.token_id for e in cancelled[:-1]]
    assert 4 <= len(tokens) < len(expected[2]) and tokens == expected[2][:len(tokens)]
    assert [e.token_id for e in streamed] == expected[4] and streamed[-1].finish_reason == "length"
    assert any(d > 0 for d in shifts)


def test_close_cancels_waiting_requests_and_submit_checks_room(model):
    engine = Engine(model, max_batch=1, max_len=32)
    with pytest.raises(SlmforgeError, match="leaves no room to generate"):
        engine.submit([1] * 32, GREEDY)
    with pytest.raises(SlmforgeError, match="outside the model's vocabulary"):
        engine.submit([VOCAB], GREEDY)
    request = engine.submit([1, 2], GREEDY)  # never started: close fails it
    engine.close()
    assert [e.finish_reason for e in request.events()] == ["cancelled"]
    with pytest.raises(SlmforgeError, match="closed"):
        engine.submit([1, 2], GREEDY)


@torch.no_grad()
def test_engines_own_their_caches(model):
    """Two engines on one model: one runs requests in its thread while the other generates in this one;
    neither touches the other's buffers, and both give the tokens of a prompt alone."""
    batch = prompts()
    expected = [alone(model, p) for p in batch]
    first, second = Engine(model, max_batch=2), Engine(model, max_batch=2)
    first.start()
    submitted = [first.submit(p, GREEDY) for p in batch]
    got = second.generate(batch, GREEDY)
    for request in submitted:
        assert request.done.wait(60)
    first.close()
    assert [r.completion.token_ids for r in submitted] == expected and [c.token_ids for c in got] == expected
    assert first.cache is not second.cache and first.cache.keys[0].data_ptr() != second.cache.keys[0].data_ptr()


def test_generate_while_running_goes_through_the_loop(model):
    batch = prompts()
    engine = Engine(model, max_batch=4)
    engine.start()
    try:
        got = engine.generate(batch, GREEDY)
    finally:
        engine.close()
    assert [c.token_ids for c in got] == [alone(model, p) for p in batch]


@torch.no_grad()
def test_the_cache_grows_as_requests_need_it(model, monkeypatch):
    """Columns are allocated for what the batch holds (here in steps of 2) and grown, copied, as decoding
    needs more and as longer prompts join; on the gemma3-like model the sliding layers' full buffers
    become rings (window 6) on the way. Every request still gets its tokens alone."""
    from slmforge.inference import engine as engine_module

    batch = prompts((2, 3, 8), seed=5)  # sampled: the random llama's greedy tokens repeat, hiding a wrong key
    params = [SamplingParams(max_new_tokens=n, stop_at_eos=False, temperature=1.0, seed=n) for n in (24, 20, 12)]
    expected = [alone(model, p, q) for p, q in zip(batch, params)]  # in one allocation
    monkeypatch.setattr(engine_module, "COLUMN_BUCKET", 2)
    engine = Engine(model, max_batch=3)
    widths, ring_layers, requests, events = [], [], {}, {}

    def on_event(event):
        events.setdefault(event.request_id, []).append(event.token_id)
        widths.append(engine.width)
        ring_layers.append(sum(engine.cache.ring))
        if event.request_id == requests[0].id and len(events[event.request_id]) in (2, 5):
            k = (2, 5).index(len(events[event.request_id])) + 1
            requests[k] = engine.submit(batch[k], params[k], on_event=on_event)

    requests[0] = engine.submit(batch[0], params[0], on_event=on_event)
    with engine._drive:  # drive the loop here, step by step (no thread): the same steps as the thread's
        while not all(k in requests and requests[k].done.is_set() for k in range(3)):
            engine._step()
    assert [events[requests[k].id] for k in range(3)] == expected
    assert widths[0] == 4 and len(set(widths)) >= 3  # 2 + 1 columns, in steps of 2; grown several times
    if model.has_local_layers:
        assert ring_layers[0] == 0 and max(ring_layers) > 0


def test_a_stream_left_early_frees_its_rows(model):
    batch = prompts()
    engine = Engine(model, max_batch=2)
    for _ in zip(range(5), engine.stream(batch, GREEDY)):
        pass
    assert engine.active == 0 and engine.waiting == 0  # ended when the loop stopped reading
    assert [c.token_ids for c in engine.generate(batch[:2], GREEDY)] == [alone(model, p) for p in batch[:2]]


@torch.no_grad()
def test_a_request_has_left_the_batch_when_its_last_event_arrives(model):
    """Two slots, three requests: at each last event (length, length, cancelled) `active` and `waiting`
    count only the others, so a consumer that sees "finished" never sees its own request still there."""
    engine = Engine(model, max_batch=2)
    budgets = (3, 40, 4)
    requests, seen = [], {}

    def on_event(event):
        if event.finish_reason is None:
            return
        seen[event.request_id] = (event.finish_reason, engine.active, engine.waiting)
        if event.request_id == requests[2].id:
            requests[1].cancel()

    for prompt, budget in zip(prompts((3, 5, 2)), budgets):  # queued before the loop runs: two join, one waits
        requests.append(engine.submit(prompt, SamplingParams(max_new_tokens=budget, stop_at_eos=False),
                                      on_event=on_event))
    assert (engine.active, engine.waiting) == (0, 3)
    engine.start()
    try:
        assert all(r.done.wait(60) for r in requests)
    finally:
        engine.close()
    assert [seen[r.id] for r in requests] == [("length", 1, 1), ("cancelled", 0, 0), ("length", 1, 0)]
    assert requests[1].completion.completion_tokens < 40


@torch.no_grad()
def test_cpu_threads_follow_the_rows_running(model, monkeypatch):
    """With a FLOPs bound between one and two rows, a batch of three runs on torch's threads (2) until
    one row is left, then on one thread: set_num_threads is called on each change only, torch's
    setting is restored after, and the tokens are those of each prompt alone."""
    from slmforge.inference import decoding

    batch = prompts((4, 7, 2))
    budgets = [SamplingParams(max_new_tokens=n, stop_at_eos=False) for n in (3, 5, 12)]
    expected = [alone(model, p)[:b.max_new_tokens] for p, b in zip(batch, budgets)]
    monkeypatch.setattr(decoding, "SINGLE_THREAD_STEP_FLOPS", 3 * model.cfg.num_parameters())
    calls = []
    set_threads = torch.set_num_threads
    previous = torch.get_num_threads()
    set_threads(2)
    try:
        monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or set_threads(n))
        got = Engine(model, max_batch=3).generate(batch, budgets)
        after = torch.get_num_threads()
    finally:
        set_threads(previous)
    assert [c.token_ids for c in got] == expected
    assert calls == [1, 2] and after == 2  # down to one thread for the last row, then restored
