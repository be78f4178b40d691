"""Text generation: KV-cached decoding with temperature, top-k, top-p, repetition penalty, seed, streaming."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.models import Decoder
from slmforge.models.registry import family


@dataclass
class SamplingConfig:
    max_new_tokens: int = 100
    """Tokens to generate at most."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy (always the most likely token)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches p (1 = off)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the context (CTRL-style: divide positive logits, multiply negative)."""
    stop_at_eos: bool = True
    """Stop a sequence when it produces the end-of-sequence token."""
    seed: int | None = None
    """Seed for sampling; the same seed, model and prompt give the same text."""
    threads: int = 0
    """CPU intra-op threads while decoding; 0 = choose: one thread when a decoding step is small (see
    `decode_threads`), else torch's default. Ignored on GPUs."""
    window_cache: bool = True
    """Sliding-window layers cache only their window (a ring) and attend to it alone; false keeps every
    token on every layer (same tokens, slower and larger on long contexts)."""

    def validate(self) -> None:
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.threads >= 0, "threads", f"must be >= 0 (0 = choose), got {self.threads}")
        require(self.repetition_penalty > 0, "repetition_penalty",
                f"must be positive, got {self.repetition_penalty}")


# ---------------------------------------------------------------- logit processing (B, V) -> (B, V)


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id that occurs in `context` (B, T): positive logits / p, negative * p."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix of tokens, by descending probability, whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p  # the first token always stays (its mass_before is 0)
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, context: torch.Tensor, cfg: SamplingConfig,
               generator: torch.Generator | None) -> torch.Tensor:
    """Choose the next token (B,) from last-position logits (B, V)."""
    logits = apply_repetition_penalty(logits.float(), context, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------- decoding loop


@torch.no_grad()
def generate_ids(model: Decoder, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None = None,
                 on_token: Callable[[int], None] | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `prompt` (B, T) and return (B, T + new). `on_token` sees batch row 0's tokens as they come.

    An encoder-decoder reads `prompt` as its source and returns the source followed by the target
    (see `seq2seq_generate` for beams and the cached cross-attention)."""
    if family(model.cfg).kind == "encoder-decoder":
        return _generate_encdec(model, prompt, cfg, eos_id, on_token, use_cache)
    if family(model.cfg).kind != "decoder":
        raise SlmforgeError(f"model family {model.cfg.family!r} is an encoder: it fills masks rather than "
                            f"continuing text; use `slmforge fill-mask`")
    threads = cfg.threads or decode_threads(model, prompt.shape[0], prompt.device)
    with cpu_threads(threads if prompt.device.type == "cpu" else None):
        return _decode(model, prompt, cfg, eos_id, on_token, use_cache)


# CPU decoding of a small model is a chain of tiny matmuls: with several intra-op threads every op pays
# to wake and join them, and on shared cores one descheduled thread stalls every op. Issue 17 measured
# the same llama-tiny run at 0.13 s with 1 thread and 7.8 s with 2 on 2 busy cores (and 0.66 s vs 37 s).
# Below this many FLOPs per decoding step one thread is used; above it torch's default (all cores).
# Measured only on 2 shared cores, where one thread won up to ~27 MFLOP a step (gemma3-tiny, batch 8);
# the bound is kept low so that mid-size models (30M+ parameters) keep every core on a quiet machine.
SINGLE_THREAD_STEP_FLOPS = 64e6


def decode_threads(model: Decoder, batch_size: int, device: torch.device) -> int:
    """Intra-op threads for decoding on `device`: 1 on CPU when one step (2 FLOPs per parameter per row,
    the output layer included) is below SINGLE_THREAD_STEP_FLOPS, else torch's current setting."""
    if device.type != "cpu":
        return torch.get_num_threads()
    step_flops = 2 * batch_size * model.cfg.num_parameters()
    return 1 if step_flops < SINGLE_THREAD_STEP_FLOPS else torch.get_num_threads()


@contextmanager
def cpu_threads(threads: int | None):
    """torch.set_num_threads(threads) for the duration, restored after (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _decode(model: Decoder, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None,
            on_token: Callable[[int], None] | None, use_cache: bool) -> torch.Tensor:
    model.eval()
    device = prompt.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    room = model.cfg.max_seq_len - prompt.shape[1]
    if room <= 0:
        raise SlmforgeError(f"prompt of {prompt.shape[1]} tokens leaves no room to generate: the model's "
                            f"context (max_seq_len) is {model.cfg.max_seq_len} tokens")
    steps = min(cfg.max_new_tokens, room)
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps, ring=cfg.window_cache) if use_cache else None
    step_input = prompt
    for _ in range(steps):
        hidden = model(step_input if use_cache else tokens, cache=cache)
        logits = model.logits(hidden[:, -1])  # project only the last position: (B, V), not (B, T, V)
        chosen = next_token(logits, tokens, cfg, generator)
        if eos_id is not None and cfg.stop_at_eos:
            chosen = torch.where(finished, torch.full_like(chosen, eos_id), chosen)
            finished |= chosen == eos_id
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        step_input = chosen[:, None]
        if on_token is not None and not (eos_id is not None and int(chosen[0]) == eos_id):
            on_token(int(chosen[0]))
        if eos_id is not None and cfg.stop_at_eos and bool(finished.all()):  # a host sync: only when it can stop
            break
    return tokens


def _generate_encdec(model, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None,
                     on_token: Callable[[int], None] | None, use_cache: bool) -> torch.Tensor:
    from dataclasses import fields

    from slmforge.seq2seq_generate import Seq2SeqConfig, generate_seq2seq

    shared = {f.name: getattr(cfg, f.name) for f in fields(SamplingConfig) if f.name in Seq2SeqConfig.__dataclass_fields__}
    target = generate_seq2seq(model, prompt, Seq2SeqConfig(**shared), eos_id=eos_id, use_cache=use_cache,
                              choose=next_token)
    if on_token is not None:  # the whole target at once: the encoder-decoder path does not stream
        for token in target[0].tolist():
            if token == eos_id:
                break
            on_token(token)
    return torch.cat([prompt, target], dim=1)


def generate_text(model: Decoder, tokenizer, prompt: str, cfg: SamplingConfig, stream: bool = False,
                  out=None, add_bos: bool = True, stop_id: int | None = None) -> str:
    """Continue a text prompt; with `stream`, characters are written to `out` as they are decoded.

    `add_bos` must match how the model was trained (the checkpoint's meta.json records it); `stop_id`
    ends the answer (default: eos; a chat model's end-of-turn token)."""
    stop_id = stop_id if stop_id is not None else tokenizer.eos_id
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if family(model.cfg).kind == "encoder-decoder":  # a source as span corruption made them: text eos
        ids = ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    elif add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    on_token = None
    if stream:
        decoder = tokenizer.decode_stream()

        def on_token(token_id: int) -> None:
            piece = decoder.step(token_id)
            if piece:
                (out or sys.stdout).write(piece)  # looked up now: a default bound at import goes stale
                (out or sys.stdout).flush()

    tokens = generate_ids(model, prompt_ids, cfg, eos_id=stop_id, on_token=on_token)
    new = tokens[0, len(ids):].tolist()
    if stop_id is not None and stop_id in new:
        new = new[:new.index(stop_id)]
    return tokenizer.decode(new)


# ---------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model (KV cache, streaming)",
                       description="Generate text from a run or checkpoint folder. Sampling fields: "
                                   "max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed.")
    p.add_argument("model", help="run folder or checkpoint folder")
    p.add_argument("--prompt", "-p", action="append", help="prompt text (repeatable); default: read stdin")
    p.add_argument("--num-samples", "-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the run's chat template (fine-tuned runs) and stop "
                        "at the end of the answer")
    p.add_argument("--system", default="", help="with --chat: a system message before the prompt")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list of {prompt, sample, seed, completion} instead of streaming text")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="sampling fields, e.g. temperature=0.7 top_k=50 top_p=0.9 seed=1")
    p.set_defaults(func=_run)


def read_prompt(stdin) -> str:
    """The prompt from standard input; on a terminal, say so first (otherwise the command just waits)."""
    if stdin.isatty():
        print("reading the prompt from standard input (Ctrl-D to end; or pass -p \"prompt\")",
              file=sys.stderr, flush=True)
    return stdin.read()


def _run(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.runtime import resolve_device
    from slmforge.runs import open_run

    sampling = config.load(SamplingConfig, overrides=args.overrides)
    if args.num_samples < 1:
        raise SlmforgeError(f"--num-samples: must be at least 1, got {args.num_samples}")
    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    if run.kind == "encoder":
        raise SlmforgeError(f"{args.model}: a {run.model.cfg.family} encoder fills masks rather than continuing "
                            f"text; use `slmforge fill-mask {args.model} \"text with [MASK]\"`")
    model, meta = run.model, run.meta
    tokenizer = run.tokenizer()
    prompts = args.prompt or [read_prompt(sys.stdin)]
    inputs = prompts  # what the model reads: the prompts, or with --chat their rendered turns
    add_bos, stop_id = meta.get("add_bos", True), None
    if args.chat:
        from slmforge.tokenizer.chat import chat_prompt

        inputs = [chat_prompt(tokenizer, p, args.system) for p in prompts]
        add_bos = False  # the template places bos itself
        stop = (meta.get("finetune") or {}).get("stop_token")
        stop_id = tokenizer.token_to_id(stop) if stop else None
    base_seed = sampling.seed
    results = []
    for prompt, text_in in zip(prompts, inputs):
        for i in range(args.num_samples):
            # sample i of every prompt uses seed + i: the same prompt and seed give the same text
            sampling.seed = None if base_seed is None else base_seed + i
            if args.json:
                text = generate_text(model, tokenizer, text_in, sampling, add_bos=add_bos, stop_id=stop_id)
                results.append({"prompt": prompt, "sample": i, "seed": sampling.seed, "completion": text})
                continue
            if not args.chat:  # a continuation reads on from its prompt; a chat answer stands alone
                sys.stdout.write(prompt)
            generate_text(model, tokenizer, text_in, sampling, stream=True, add_bos=add_bos, stop_id=stop_id)
            sys.stdout.write("\n\n")
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0
