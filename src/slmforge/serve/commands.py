"""`slmforge serve RUN`: the run's model behind an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from slmforge.serve.settings import Limits

API_KEY_VARIABLE = "SLMFORGE_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (completions, chat, streaming)",
                       description="Serve a decoder run over HTTP with OpenAI's API: /v1/completions, "
                                   "/v1/chat/completions (the run's chat template), /v1/models, /health; "
                                   "streaming, stop, max_tokens, temperature, top_p, seed, n. Requests share the "
                                   "engine's running batch (continuous batching). Listens on 127.0.0.1 unless "
                                   "--host says otherwise; any other address needs an API key. Needs "
                                   "pip install 'slmforge[serve]'. See docs/serving.md.")
    p.add_argument("model", help="run folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = a free one)")
    p.add_argument("--api-key", default=None,
                   help=f"clients must send Authorization: Bearer KEY (default: the {API_KEY_VARIABLE} variable, "
                        f"which keeps the key out of the process list)")
    p.add_argument("--model-name", help="the model's name in the API (default: the run folder's name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=16,
                   help="engine slots: generations decoded together in one batch (default 16)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for decoding (default 0: the engine's choice, one thread for small models; "
                        "1 is best on cores other work shares)")
    limits = p.add_argument_group("limits (each request that exceeds one gets a 4xx with OpenAI's error body)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt in tokens (default: the model's context less one)")
    limits.add_argument("--max-tokens", type=int, default=Limits.max_tokens,
                        help=f"largest max_tokens a request may ask for; a chat request that names none gets up "
                             f"to this (default {Limits.max_tokens})")
    limits.add_argument("--max-queue", type=int, default=Limits.max_queue,
                        help=f"generations that may wait for a free slot; beyond slots + queue, requests get 429 "
                             f"(default {Limits.max_queue})")
    limits.add_argument("--timeout", type=float, default=Limits.timeout,
                        help=f"seconds a request may take, waiting included; then it is stopped with 504 "
                             f"(default {Limits.timeout:g})")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slmforge.errors import SlmforgeError
    from slmforge.formatting import say

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise SlmforgeError(f"serve needs FastAPI and uvicorn ({' and '.join(missing)} missing): "
                            f"pip install 'slmforge[serve]'")
    from slmforge.serve.app import create_app
    from slmforge.serve.server import Server, bind, check_exposure

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    if api_key is not None and not api_key.strip():
        raise SlmforgeError("--api-key: empty")
    check_exposure(args.host, api_key)  # before the model loads: a refusal should be instant
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    timeout=args.timeout)
    check_limits(limits, args.max_batch, args.threads)
    sock = bind(args.host, args.port)
    try:
        served = open_served(args.model, args.model_name, args.device, args.max_batch, limits, api_key, args.threads)
        try:
            server = Server(create_app(served), sock, access_log=not os.environ.get("SLMFORGE_QUIET"))
            say(f"serving {args.model} as {served.model_name!r} at {server.url}/v1 ({served.engine.max_batch} slots, "
                f"context {served.engine.max_len} tokens{', API key required' if api_key else ''}); Ctrl-C stops")
            try:
                server.run()
            except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: uvicorn re-raises it once shut down
                say("stopped")
        finally:
            served.engine.close()
    finally:
        sock.close()
    return 0


def check_limits(limits: Limits, max_batch: int, threads: int) -> None:
    from slmforge.errors import SlmforgeError

    if max_batch < 1:
        raise SlmforgeError(f"--max-batch: must be at least 1, got {max_batch}")
    if threads < 0:
        raise SlmforgeError(f"--threads: must be 0 (the engine's choice) or more, got {threads}")
    if limits.max_prompt_tokens is not None and limits.max_prompt_tokens < 1:
        raise SlmforgeError(f"--max-prompt-tokens: must be at least 1, got {limits.max_prompt_tokens}")
    if limits.max_tokens < 1:
        raise SlmforgeError(f"--max-tokens: must be at least 1, got {limits.max_tokens}")
    if limits.max_queue < 0:
        raise SlmforgeError(f"--max-queue: must be 0 or more, got {limits.max_queue}")
    if not limits.timeout > 0:
        raise SlmforgeError(f"--timeout: must be positive seconds, got {limits.timeout}")


def open_served(model: str | Path, model_name: str | None, device: str, max_batch: int, limits: Limits,
                api_key: str | None, threads: int = 0):
    """The run opened, its engine built and started: what the app serves."""
    from slmforge.checkpoint.reading import open_run, run_dir_of
    from slmforge.errors import SlmforgeError
    from slmforge.inference.engine import Engine
    from slmforge.inference.prompt import prompt_format as read_prompt_format
    from slmforge.runtime import resolve_device
    from slmforge.serve.settings import Served

    run = open_run(model, device=resolve_device(device, "--device"))
    if run.kind != "decoder":
        raise SlmforgeError(f"{model}: a {run.model.cfg.family} model is not a decoder; serve generates text with "
                            f"decoders (use `slmforge fill-mask` / `slmforge translate` for the others)")
    tokenizer = run.tokenizer()
    prompt_format = read_prompt_format(run, tokenizer)
    engine = Engine(run.model, tokenizer, prompt_format, run.device, max_batch=max_batch, threads=threads)
    engine.start()
    name = model_name or run_dir_of(run.step_dir).name
    return Served(engine, prompt_format, name, run.model.cfg.vocab_size, api_key, limits)
