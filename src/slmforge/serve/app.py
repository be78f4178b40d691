"""The OpenAI-compatible HTTP app: routes, authentication, limits, and the bridge from the engine's
thread to the event loop. `create_app(Served(...))` returns an ASGI app any ASGI server runs; `server.py`
runs it with uvicorn.

Every request the server refuses gets a 4xx with OpenAI's error body; an unexpected failure gets a 500
with the same body and its traceback goes to the server's log only. Generation runs on the engine's
own thread (continuous batching): each HTTP request submits one engine request per choice, and the
engine's events come back to the event loop through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from slmforge.errors import SlmforgeError
from slmforge.inference.sampling import SamplingParams
from slmforge.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_completion,
    completion,
    error_body,
    new_id,
    validation_message,
)
from slmforge.serve.settings import Served

log = logging.getLogger("slmforge.serve")

# How often a request that waits for tokens checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
# Finish reasons of the engine that are not an answer: our own cancels never reach a client, so these
# mean the engine was closed under the request or a decoding step failed.
ENGINE_ENDED = ("cancelled", "error")


class Admission:
    """Generations in flight (running or waiting for an engine slot), bounded by the engine's slots plus
    the queue. Touched only from the event loop, so a plain counter is enough."""

    def __init__(self, capacity: int):
        self.capacity, self.in_flight = capacity, 0

    def fits(self, count: int) -> None:
        """Refuse (400) a request of more generations than the server ever runs at once."""
        if count > self.capacity:
            raise APIError(400, f"the request asks for {count} generations; this server runs at most "
                                f"{self.capacity} at once", param="n")

    def take(self, count: int) -> Callable[[], None]:
        """Admit `count` generations or refuse with 429; returns the release (safe to call twice)."""
        self.fits(count)
        if self.in_flight + count > self.capacity:
            raise APIError(429, f"the server is busy ({self.in_flight} generations in flight, at most "
                                f"{self.capacity}); retry later", type="rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= count

        return release


class Generations:
    """The engine requests of one HTTP request, their events merged onto one asyncio queue as
    (choice index, event). The engine calls `on_event` on its own thread; the event crosses to the
    loop with call_soon_threadsafe (a loop already closed at shutdown drops it)."""

    def __init__(self, engine, jobs: list[tuple[list[int], SamplingParams]], loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests, self.finished = [], [False] * len(jobs)
        self._getter: asyncio.Future | None = None
        try:
            for index, (ids, params) in enumerate(jobs):
                self.requests.append(engine.submit(ids, params, on_event=self._deliver(loop, index)))
        except BaseException:
            self.cancel()
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int):
        def deliver(event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: the server stopped
                pass

        return deliver

    @property
    def running(self) -> bool:
        return not all(self.finished)

    async def next(self, timeout: float):
        """The next (index, event), or None when `timeout` seconds pass first. The pending get survives
        a timeout (it is never cancelled mid-way), so no event is lost."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=max(timeout, 0))
        if not done:
            return None
        index, event = self._getter.result()
        self._getter = None
        if event.finish_reason is not None:
            self.finished[index] = True
        return index, event

    def cancel(self) -> None:
        """Cancel every engine request not finished yet (their slots free at the next step)."""
        for request, finished in zip(self.requests, self.finished):
            if not finished:
                request.cancel()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class EventStream(StreamingResponse):
    """Server-sent events whose end, however it comes (the last chunk, the client leaving, an error),
    runs `on_close`: the unfinished engine requests are cancelled and the admission released. The
    client leaving is noticed while no chunk is being sent too (a request still waiting for a slot),
    by listening for the disconnect beside the stream."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def create_app(served: Served) -> FastAPI:
    engine, limits = served.engine, served.limits
    admission = Admission(engine.max_batch + limits.max_queue)
    app = FastAPI(title="slmforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.admission = served, admission

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(error_body(message.get(error.status_code, str(error.detail)), code=code),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> JSONResponse:
        # nobody reads it; 499 is what nginx logs for a client that closed the request
        return JSONResponse(error_body("the client closed the request"), status_code=499)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)  # the server's log only
        return JSONResponse(error_body("the server failed on this request (see its log)", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Open without a key (for load balancers); `active` and `waiting` count generations in the
        engine's batch and queued for a slot."""
        return {"status": "ok", "active": engine.active, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request, served)
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request, served)
        check_model(name, served)
        return model_card(served)

    async def accept(request: Request, kind):
        """(the request's arrival time, its checked body): authorized, parsed, for this model, no field
        we cannot honour."""
        arrived = time.monotonic()
        authorize(request, served)
        body = await parse(request, kind, limits.max_body_bytes)
        check_model(body.model, served)
        body.refuse_unsupported()
        return arrived, body

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived, body = await accept(request, CompletionRequest)
        texts = body.prompts()
        admission.fits(len(texts) * body.n)  # before the tokenizer works on them
        prompts = [await anyio.to_thread.run_sync(prompt_ids, p, served) for p in texts]
        return await respond(request, body, prompts, body.max_tokens, "prompt", arrived, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived, body = await accept(request, ChatCompletionRequest)
        messages = [m.as_template_input() for m in body.messages]
        ids = await anyio.to_thread.run_sync(chat_ids, messages, served)
        return await respond(request, body, [ids], body.requested_tokens(), "messages", arrived, chat=True)

    async def respond(request: Request, body, prompts: list[list[int]], requested: int | None, prompt_param: str,
                      arrived: float, chat: bool):
        """Admit the request's generations, submit them, and answer: streamed, or whole when all have ended."""
        jobs = plan(prompts, body, requested, prompt_param, served)
        release = admission.take(len(jobs))
        try:
            generations = Generations(engine, jobs, asyncio.get_running_loop())
        except (SlmforgeError, ValueError) as e:
            release()
            raise APIError(400, str(e)) from None
        except BaseException:
            release()
            raise
        deadline = arrived + limits.timeout
        prompt_tokens = sum(len(ids) for ids in prompts)

        def close() -> None:
            generations.cancel()
            release()

        if body.stream:
            events = stream_events(generations, ChunkWriter(chat, served.model_name), deadline, limits.timeout,
                                   prompt_tokens, body.include_usage())
            return EventStream(events, on_close=close)
        try:
            texts, reasons, completion_tokens = await collect(request, generations, deadline, limits.timeout)
        finally:
            close()
        make = chat_completion if chat else completion
        return make(new_id("chatcmpl" if chat else "cmpl"), served.model_name, texts, reasons, prompt_tokens,
                    completion_tokens)

    return app


# ---------------------------------------------------------------- request handling


class ClientGone(Exception):
    """The client of a non-streamed request disconnected: nobody is left to answer."""


def authorize(request: Request, served: Served) -> None:
    """With an API key, every /v1 route needs `Authorization: Bearer KEY` (compared in constant time)."""
    if served.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), served.api_key.encode()):
        raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                       code="invalid_api_key")


async def parse(request: Request, model: type[BaseModel], max_bytes: int):
    """The JSON body as `model`, or a 400 naming what is wrong (413 when it is too large)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body has {int(declared):,} bytes; this server takes at most {max_bytes:,}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the request body is larger than the {max_bytes:,} bytes this server takes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise APIError(400, message, param=param) from None


def check_model(name: str, served: Served) -> None:
    if name != served.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served.model_name!r}",
                       param="model", code="model_not_found")


def model_card(served: Served) -> dict[str, Any]:
    return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "slmforge"}


def prompt_ids(prompt: str | list[int], served: Served) -> list[int]:
    """A completion prompt as token ids: text encoded as the run was trained (bos where it used one);
    ids checked against the vocabulary."""
    if isinstance(prompt, str):
        try:
            ids = list(served.prompt_format.encode(prompt))
        except SlmforgeError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
    else:
        bad = next((i for i in prompt if not 0 <= i < served.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{served.vocab_size - 1})",
                           param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, "prompt: encodes to no tokens (and the model uses no bos token): nothing to continue",
                       param="prompt")
    return ids


def chat_ids(messages: list[dict[str, Any]], served: Served) -> list[int]:
    """The conversation rendered with the run's chat template, up to the assistant's answer."""
    if not served.prompt_format.chat_template:
        raise APIError(400, f"the model {served.model_name!r} has no chat template (it was not fine-tuned for "
                            f"chat); use /v1/completions", param="messages", code="no_chat_template")
    try:
        ids = list(served.prompt_format.chat(messages))
    except SlmforgeError as e:
        raise APIError(400, f"messages: {str(e).removeprefix('--chat: ')}", param="messages") from None
    if not ids:
        raise APIError(400, "messages: the chat template renders this conversation as no tokens", param="messages")
    return ids


def plan(prompts: list[list[int]], body, requested: int | None, prompt_param: str,
         served: Served) -> list[tuple[list[int], SamplingParams]]:
    """One engine request per choice (prompt i, sample j -> choice i * n + j, seed + j), after the
    prompt-length, max_tokens and context checks."""
    limits, context = served.limits, served.engine.max_len
    longest = max(len(ids) for ids in prompts)
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    if longest > max_prompt:
        raise APIError(400, f"{prompt_param}: {longest} tokens, more than the {max_prompt} this server takes "
                            f"(the model's context is {context} tokens)", param=prompt_param,
                       code="context_length_exceeded")
    if requested is not None and requested > limits.max_tokens:
        raise APIError(400, f"max_tokens: {requested} is more than this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    if requested is not None and longest + requested > context:
        raise APIError(400, f"this model's context is {context} tokens; the request needs {longest + requested} "
                            f"({longest} in the {prompt_param}, {requested} for max_tokens)", param="max_tokens",
                       code="context_length_exceeded")
    jobs = []
    for ids in prompts:
        tokens = requested if requested is not None else min(limits.max_tokens, context - len(ids))
        for sample in range(body.n):
            seed = None if body.seed is None else body.seed + sample
            params = SamplingParams(max_tokens=tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=seed,
                                    stop=body.stop_strings(), stop_at_eos=not body.ignore_eos)
            jobs.append((ids, params))
    return jobs


def engine_ended(reason: str) -> APIError:
    """A generation the engine ended itself: it was closed (the server is stopping), or a step failed."""
    if reason == "cancelled":
        return APIError(503, "the server is shutting down; retry", type="server_error", code="shutting_down")
    return APIError(500, "generation failed on the server (see its log)", type="server_error")


def timed_out(timeout: float) -> APIError:
    return APIError(504, f"the request ran longer than this server's limit of {timeout:g} s; ask for fewer "
                         f"tokens or retry when the server is less busy", type="timeout_error", code="request_timeout")


async def collect(request: Request, generations: Generations, deadline: float,
                  timeout: float) -> tuple[list[str], list[str], int]:
    """Every choice's whole text, finish reason, and the completion tokens of all of them."""
    count = len(generations.finished)
    texts, reasons, tokens = [""] * count, [""] * count, [0] * count
    checked = time.monotonic()
    while generations.running:
        now = time.monotonic()
        if now >= deadline:
            raise timed_out(timeout)
        if now - checked >= DISCONNECT_POLL_SECONDS:  # also while tokens keep coming
            if await request.is_disconnected():
                raise ClientGone()
            checked = now
        got = await generations.next(min(deadline - now, DISCONNECT_POLL_SECONDS))
        if got is None:
            continue
        index, event = got
        if event.finish_reason in ENGINE_ENDED:
            raise engine_ended(event.finish_reason)
        texts[index] += event.text
        tokens[index] = event.completion_tokens
        if event.finish_reason is not None:
            reasons[index] = event.finish_reason
    return texts, reasons, sum(tokens)


async def stream_events(generations: Generations, writer: ChunkWriter, deadline: float, timeout: float,
                        prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    count = len(generations.finished)
    tokens = [0] * count
    for index in range(count):
        if (opening := writer.start(index)) is not None:
            yield opening
    while generations.running:
        left = deadline - time.monotonic()
        got = await generations.next(left) if left > 0 else None
        if got is None:  # the deadline passed: the status line is sent, so the error goes in the stream
            yield writer.error(timed_out(timeout))
            return
        index, event = got
        if event.finish_reason in ENGINE_ENDED:
            yield writer.error(engine_ended(event.finish_reason))
            return
        tokens[index] = event.completion_tokens
        if event.text:
            yield writer.text(index, event.text)
        if event.finish_reason is not None:
            yield writer.finish(index, event.finish_reason)
    if include_usage:
        yield writer.usage(prompt_tokens, sum(tokens))
    yield writer.done()
