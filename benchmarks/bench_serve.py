"""`slmforge serve` throughput: the same streamed completion requests sent one by one (1 client) and by 8
and 32 concurrent clients, against one server process (continuous batching), interleaved and repeated.
Prints requests/s, generated tokens/s and CPU seconds (server and client processes) per configuration,
with the ratio to one by one. Issue 27's target: 32 concurrent clients >= 4x the one-by-one throughput.

Every request is greedy with ignore_eos, so each generates exactly --new tokens (checked from its usage)
and its text is the same whichever configuration sent it (checked: batching must not change answers).

    python -m benchmarks.bench_serve [--preset llama-tiny] [--requests 64] [--new 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPUS = [
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "মই কাইলৈ গুৱাহাটীলৈ যাম আৰু তাত বজাৰ কৰিম।",
    "বাংলা ভাষা খুব মিষ্টি। আমি কাল কলকাতায় যাব।",
    "Die Straße in München ist im Winter sehr schön, sagt meine Großmutter.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Small language models can be trained on a single machine in a day.",
] * 20


def make_run(root: Path, preset: str) -> Path:
    """A run with a BPE tokenizer trained on CORPUS and a randomly initialised `preset` decoder."""
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.models import DecoderConfig, build_model
    from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    tokenizer = load_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=512), root / "tok", CORPUS))
    model = build_model(DecoderConfig.from_name(preset, vocab_size=tokenizer.vocab_size), seed=0)
    run = root / "bench-run"
    save_checkpoint(run, 1, model, extra_meta={"add_bos": True, "tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(run / "tokenizer")
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "slmforge", "--quiet", "serve", str(run), "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "256", "--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    until = time.monotonic() + 120
    while time.monotonic() < until:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 120 s")


async def one_request(client, url: str, prompt: str, new: int) -> tuple[str, int]:
    """Send one streamed completion; its text and the completion tokens its usage reports."""
    body = {"model": "bench-run", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, tokens = [], None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens


async def send_all(url: str, prompts: list[str], clients: int, new: int) -> list[tuple[str, int]]:
    """`clients` concurrent clients, each sending its share of the prompts one after another."""
    import httpx

    results: list[tuple[str, int] | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(first: int) -> None:
            for index in range(first, len(prompts), clients):
                results[index] = await one_request(client, url, prompts[index], new)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration and round")
    parser.add_argument("--new", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per configuration (1 = one by one)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's engine slots")
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads (0: the engine's choice)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    words = " ".join(CORPUS).split()
    prompts = [" ".join(words[i * 7 % len(words):][:4 + i % 24]) for i in range(args.requests)]  # 4..27 words
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.preset)
        port = free_port()
        server = start_server(run, port, args.max_batch, args.threads)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            asyncio.run(send_all(url, prompts[:8], 8, 4))  # warm-up: first steps, connections
            texts: dict[int, list[str]] = {}
            wall = {c: [] for c in counts}
            cpu_server = {c: [] for c in counts}
            cpu_client = {c: [] for c in counts}
            for round_index in range(args.rounds):
                order = counts if round_index % 2 == 0 else counts[::-1]  # a load burst hits every side alike
                for clients in order:
                    start_wall, start_cpu = time.perf_counter(), process_cpu_seconds(server.pid)
                    start_client = time.process_time()
                    results = asyncio.run(send_all(url, prompts, clients, args.new))
                    wall[clients].append(time.perf_counter() - start_wall)
                    cpu_server[clients].append(process_cpu_seconds(server.pid) - start_cpu)
                    cpu_client[clients].append(time.process_time() - start_client)
                    assert all(tokens == args.new for _, tokens in results), "a request generated fewer tokens"
                    texts.setdefault(clients, [text for text, _ in results])
        finally:
            server.terminate()
            server.wait(timeout=30)
    same = all(texts[c] == texts[counts[0]] for c in counts)
    assert same, "a request's text depended on how many clients were sending"

    tokens = args.requests * args.new
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"slmforge serve, {args.preset} (random weights), {args.requests} streamed requests x {args.new} new "
          f"tokens (greedy, ignore_eos), prompts 4-27 words; server --max-batch {args.max_batch} "
          f"--threads {args.threads}; "
          f"{args.rounds} rounds interleaved; {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}; texts identical "
          f"across configurations: {same}")
    baseline = statistics.median(wall[counts[0]])
    baseline_cpu = statistics.median(cpu_server[counts[0]])
    print(f"{'clients':>16} {'requests/s':>11} {'tokens/s':>10} {'wall s':>8} {'server cpu s':>13} "
          f"{'client cpu s':>13} {'ratio (wall)':>13} {'ratio (server cpu)':>19}")
    for clients in counts:
        median, cpu = statistics.median(wall[clients]), statistics.median(cpu_server[clients])
        label = f"{clients}" + (" (one by one)" if clients == 1 else "")
        print(f"{label:>16} {args.requests / median:11.1f} {tokens / median:10.0f} {median:8.2f} {cpu:13.2f} "
              f"{statistics.median(cpu_client[clients]):13.2f} {baseline / median:12.2f}x {baseline_cpu / cpu:18.2f}x")
    print("rounds (wall s): " + "; ".join(f"{c}: " + ", ".join(f"{w:.2f}" for w in wall[c]) for c in counts))
    if 32 in counts and counts[0] == 1:
        # On cores other work shares, wall time follows the load; the server's CPU seconds for the same
        # work are the steadier measure of what batching saves.
        print(f"32 clients vs one by one: {baseline / statistics.median(wall[32]):.2f}x wall, "
              f"{baseline_cpu / statistics.median(cpu_server[32]):.2f}x server CPU (target >= 4x throughput)")

if __name__ == "__main__":
    main()
