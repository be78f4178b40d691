"""`slmforge serve`: the official `openai` client against a real uvicorn server on a free local port,
serving tiny runs built here. What the server answers equals what the engine gives each request alone
(greedy and seeded, streamed and not, 32 clients at once); bad requests get OpenAI-style 4xx bodies and
leave the server serving; a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import randomize_weights

pytest.importorskip("fastapi", reason="serve needs FastAPI and uvicorn (pip install 'slmforge[serve]')")
pytest.importorskip("uvicorn", reason="serve needs FastAPI and uvicorn (pip install 'slmforge[serve]')")
openai = pytest.importorskip("openai", reason="the server is tested with the official openai client")
import httpx  # noqa: E402  (an openai dependency)

from slmforge.checkpoint.writing import save_checkpoint  # noqa: E402
from slmforge.cli import main  # noqa: E402
from slmforge.errors import SlmforgeError  # noqa: E402
from slmforge.finetune.templates import CHATML, CHATML_TOKENS  # noqa: E402
from slmforge.finetune.vocab import add_special_tokens  # noqa: E402
from slmforge.inference import SamplingParams  # noqa: E402
from slmforge.models import DecoderConfig, build_model  # noqa: E402
from slmforge.serve.app import create_app  # noqa: E402
from slmforge.serve.commands import open_served  # noqa: E402
from slmforge.serve.server import Server, bind, check_exposure, is_loopback  # noqa: E402
from slmforge.serve.settings import Limits, Served  # noqa: E402
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer  # noqa: E402

CORPUS = [
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "বাংলা ভাষা খুব মিষ্টি। আমি কাল কলকাতায় যাব।",
    "Die Straße in München ist im Winter sehr schön.",
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can be trained on a single machine.",
] * 8
PROMPTS = [f"{word} {i}" for i, word in enumerate(["The", "Die", "हिन्दी", "বাংলা", "small", "fox", "Winter",
                                                     "machine"] * 4)]  # 32 different prompts
CONTEXT = 2048
LONG_TOKENS = 2000  # a generation far longer than any test waits for: it only ends by being stopped


def make_run(folder: Path, model, tokenizer, meta: dict) -> Path:
    save_checkpoint(folder, 1, model, extra_meta={"add_bos": True, "tokenizer_sha256": tokenizer.sha256, **meta})
    tokenizer.save(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A chat run (ChatML template, <|im_end|> ends answers) and a base run without a template, of one
    tiny Llama with random weights large enough that greedy text varies from prompt to prompt."""
    root = tmp_path_factory.mktemp("serve")
    base = load_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), root / "tok", CORPUS))
    chat, _ = add_special_tokens(base, CHATML_TOKENS, CHATML)
    cfg = DecoderConfig.from_name("llama-tiny", vocab_size=chat.vocab_size, hidden_size=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=CONTEXT)
    model = build_model(cfg, seed=0).eval()
    randomize_weights(model, seed=0, vector_mean=1.0)
    finetune = {"finetune": {"task": "chat", "chat_template": "chatml", "stop_token": "<|im_end|>"}}
    return {"chat": make_run(root / "tiny-chat", model, chat, finetune),
            "base": make_run(root / "tiny-base", model, base, {})}


@dataclass
class Serving:
    server: Server
    served: Served
    app: object

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, api_key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def idle(self, seconds: float = 10.0) -> bool:
        """Wait until no request runs or waits in the engine and none is in flight in the app."""
        engine, admission = self.served.engine, self.app.state.admission
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if engine.active == 0 and engine.waiting == 0 and admission.in_flight == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.server.stop()
        self.served.engine.close()


def start(run: Path, api_key: str | None = None, max_batch: int = 8, **limits) -> Serving:
    served = open_served(run, None, "cpu", max_batch, Limits(**{"max_tokens": CONTEXT, **limits}), api_key)
    app = create_app(served)
    return Serving(Server(app, bind("127.0.0.1", 0), log_level="warning", access_log=False).start(), served, app)


@pytest.fixture(scope="module")
def server(runs):
    serving = start(runs["chat"])
    yield serving
    serving.stop()


@pytest.fixture
def client(server):
    return server.client()


def alone(srv: Serving, ids: list[int], **params) -> tuple[str, str, int]:
    """What the engine gives this prompt on its own (nothing else running): text, finish reason, tokens."""
    assert srv.idle(), "the engine must be idle for an offline reference"
    request = srv.served.engine.submit(ids, SamplingParams(**params))
    text, last = "", None
    for last in request.events():
        text += last.text
    return text, last.finish_reason, last.completion_tokens


def test_models_health_and_the_default_name(server, client):
    srv = server
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "slmforge"
    assert srv.idle()
    assert httpx.get(srv.url + "/health").json() == {"status": "ok", "active": 0, "waiting": 0}


def test_completion_streamed_and_not_equals_the_engine_alone(server, client):
    srv, served = server, server.served
    ids = served.prompt_format.encode("The quick")
    text, reason, count = alone(srv, ids, max_tokens=12, temperature=0)
    reply = client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=12, temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    assert reply.usage.total_tokens == len(ids) + count
    chunks = list(client.completions.create(model="tiny-chat", prompt="The quick", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == count and not chunks[-1].choices


def test_chat_streamed_and_not_equals_the_engine_alone(server, client):
    srv, served = server, server.served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "नमस्ते, fox?"}]
    ids = served.prompt_format.chat(messages)
    assert served.prompt_format.tokenizer.token_to_id("<|im_start|>") in ids  # the run's template was used
    text, reason, count = alone(srv, ids, max_tokens=16, temperature=0)
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_n_samples_use_seed_plus_i_and_stop_strings_cut_the_text(server, client):
    srv, served = server, server.served
    ids = served.prompt_format.encode("Die Straße")
    expected = [alone(srv, ids, max_tokens=10, temperature=1.0, top_p=0.9, seed=7 + i)[0] for i in range(3)]
    reply = client.completions.create(model="tiny-chat", prompt="Die Straße", max_tokens=10, temperature=1.0,
                                      top_p=0.9, seed=7, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == expected
    assert reply.usage.prompt_tokens == len(ids)  # the prompt once, as OpenAI counts it
    greedy = alone(srv, ids, max_tokens=20, temperature=0)[0]
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    assert stop.strip(), greedy
    cut = client.completions.create(model="tiny-chat", prompt="Die Straße", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_streaming_clients_each_get_their_own_text(server):
    srv, served = server, server.served
    expected = [alone(srv, served.prompt_format.encode(p), max_tokens=12, temperature=0)[0] for p in PROMPTS]

    async def one(client, prompt):
        stream = await client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def everyone():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    got = asyncio.run(everyone())
    assert len(got) == 32 and got == expected
    assert len(set(expected)) > 8  # the prompts really differ in what they continue with


def raw(url: str, body: bytes | str, **headers) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json", **headers})


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    srv = server
    url = srv.url + "/v1/completions"
    for body, status, param in [
        (b'{"model": "tiny-chat", "prompt": "x"', 400, None),            # malformed JSON
        (b'["not", "an", "object"]', 400, None),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": "tiny-chat", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"model": "tiny-chat", "prompt": "x", "temperature": 5}', 400, "temperature"),
        (b'{"model": "tiny-chat", "prompt": [5, 99999]}', 400, "prompt"),
        (b'{"model": "tiny-chat", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
        (b'{"model": "tiny-chat", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
        ('{"model": "tiny-chat", "prompt": "x", "stop": ""}', 400, "stop"),
        ('{"model": "tiny-chat", "prompt": "x", "max_tokens": "10"}', 400, "max_tokens"),  # a string is not a number
        ('{"model": "tiny-chat", "prompt": "x", "temperature": 0}', 200, None),  # an integer is a float
        ('{"model": "other", "prompt": "x"}', 404, "model"),
    ]:
        response = raw(url, body)
        assert response.status_code == status, (body, response.text)
        if status == 200:
            continue
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
        assert "Traceback" not in response.text
    assert "not valid JSON" in raw(url, b"{bad").json()["error"]["message"]
    assert raw(srv.url + "/v1/chat/completions", b'{"model": "tiny-chat", "messages": []}').status_code == 400
    assert httpx.get(srv.url + "/v1/nowhere").status_code == 404
    assert httpx.get(url).status_code == 405
    big = json.dumps({"model": "tiny-chat", "prompt": "x" * (2 << 20)})
    assert raw(url, big).status_code == 413

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="x")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-chat", prompt="fox " * CONTEXT, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded" and str(CONTEXT) in too_long.value.message
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=-3)
    assert negative.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="context"):  # fits alone, not with its max_tokens
        client.completions.create(model="tiny-chat", prompt=[5] * (CONTEXT - 10), max_tokens=50)
    assert client.completions.create(model="tiny-chat", prompt="still here", max_tokens=3).choices[0].text is not None
    assert srv.idle()


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    srv, served = server, server.served
    body = {"model": "tiny-chat", "prompt": "The", "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    ended = []
    submit = served.engine.submit

    def recording_submit(ids, params, on_event=None):  # see how the engine request ends
        def watch(event):
            if event.finish_reason is not None:
                ended.append((event.finish_reason, event.completion_tokens))
            on_event(event)
        return submit(ids, params, on_event=watch)

    served.engine.submit = recording_submit
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""  # one event, then leave
            # a generation is in the batch meanwhile, and /health counts it
            assert httpx.get(srv.url + "/health").json() == {"status": "ok", "active": 1, "waiting": 0}
        assert srv.idle()
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices within half a second
            httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert srv.idle()
    finally:
        del served.engine.submit
    assert [reason for reason, _ in ended] == ["cancelled", "cancelled"] and all(n < LONG_TOKENS for _, n in ended)
    assert client.completions.create(model="tiny-chat", prompt="The", max_tokens=3).usage.completion_tokens >= 1


def test_chat_on_a_run_without_a_template_is_a_clear_400(runs):
    srv = start(runs["base"])
    try:
        client = srv.client()
        with pytest.raises(openai.BadRequestError, match="no chat template") as error:
            client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}])
        assert error.value.code == "no_chat_template"
        assert client.completions.create(model="tiny-base", prompt="The", max_tokens=2).choices
    finally:
        srv.stop()


LONG = {"max_tokens": LONG_TOKENS, "extra_body": {"ignore_eos": True}}


def test_the_api_key_and_the_time_limit(runs):
    srv = start(runs["chat"], api_key="s3cret", timeout=0.05)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200  # open, for load balancers
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {}):
            response = httpx.get(srv.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        client = srv.client("s3cret")
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        with pytest.raises(openai.APIStatusError) as late:  # 2000 tokens take far longer than 0.05 s
            client.completions.create(model="tiny-chat", prompt="The", **LONG)
        assert late.value.status_code == 504 and late.value.code == "request_timeout"
        with pytest.raises(openai.APIError, match="limit of 0.05 s"):  # a stream gets it as its last event
            for _ in client.completions.create(model="tiny-chat", prompt="The", stream=True, **LONG):
                pass
        assert srv.idle()
    finally:
        srv.stop()


def test_a_full_server_answers_429_and_keeps_its_prompt_limit(runs):
    srv = start(runs["chat"], max_batch=1, max_queue=0, max_prompt_tokens=8)
    try:
        client = srv.client()
        with pytest.raises(openai.BadRequestError, match="more than the 8 this server takes"):
            client.completions.create(model="tiny-chat", prompt="The quick brown fox jumps over the lazy dog")
        body = {"model": "tiny-chat", "prompt": "The", "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the one slot is taken
            with pytest.raises(openai.RateLimitError) as busy:
                client.completions.create(model="tiny-chat", prompt="x", max_tokens=2)
            assert busy.value.code == "rate_limit_exceeded"
        assert srv.idle()
        with pytest.raises(openai.BadRequestError, match="at most 1"):  # could never fit
            client.completions.create(model="tiny-chat", prompt="x", max_tokens=2, n=2)
        assert client.completions.create(model="tiny-chat", prompt="x", max_tokens=2).choices
    finally:
        srv.stop()


def test_the_verb_refuses_an_exposed_host_without_key_a_missing_extra_and_a_taken_port(runs, capsys, monkeypatch):
    """Each in one line, before the model loads."""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_exposure("0.0.0.0", "key")
    with pytest.raises(SlmforgeError, match="needs an API key"):
        check_exposure("0.0.0.0", None)
    monkeypatch.delenv("SLMFORGE_API_KEY", raising=False)
    assert main(["serve", str(runs["chat"]), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0" in err and "--api-key" in err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "uvicorn" else real_find_spec(name, *rest))
    assert main(["serve", str(runs["chat"])]) == 2
    assert "uvicorn missing): pip install 'slmforge[serve]'" in capsys.readouterr().err
    monkeypatch.undo()
    taken = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(runs["chat"]), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    finally:
        taken.close()


def test_the_verb_serves_until_stopped(runs):
    """`slmforge serve RUN` as a user runs it: one line saying where, answers, and a clean stop on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    with bind("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLMFORGE_API_KEY": "k"}
    process = subprocess.Popen([sys.executable, "-m", "slmforge", "serve", str(runs["chat"]), "--port", str(port),
                                "--model-name", "mine"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        until = time.monotonic() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["mine"]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < until, process.stderr.read()
                time.sleep(0.2)
        assert client.completions.create(model="mine", prompt="The", max_tokens=3).usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    err = process.stderr.read()
    assert code in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once it has shut down cleanly
    assert "Application shutdown complete" in err
    assert f"as 'mine' at http://127.0.0.1:{port}/v1" in err and "API key required" in err
    assert "Traceback" not in err


def test_the_printed_address_is_one_a_client_can_use():
    import socket

    from slmforge.serve.server import client_url

    assert client_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert client_url("::1", 8000) == "http://[::1]:8000"
    assert client_url("0.0.0.0", 8000) == f"http://{socket.gethostname()}:8000"  # not http://0.0.0.0
