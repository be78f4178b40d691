"""Text generation: KV-cached decoding with temperature, top-k, top-p, repetition penalty, seed, streaming."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator

import torch

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.models import Decoder, KVCache
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
    static_cache: bool = False
    """Decode with fixed shapes: after the prompt, each step attends to the whole preallocated cache through
    a mask computed from the position held on the device (`Decoder.decode_step`). Same tokens; on its own
    no faster (it attends to unused slots too): it is the step `compile` compiles, kept to check it."""
    compile: bool = False
    """Compile the static decoding step (implies static_cache) with torch.compile: CUDA graphs on GPUs
    (mode reduce-overhead), inductor's default mode on CPU. The first generation pays the compile (10-20 s
    for a tiny model on CPU); later ones reuse it (the first new batch size or 256-token cache bucket
    compiles once more). Same tokens as the default path in float32 (tested); in bf16 the masked
    attention over the whole buffer may round differently from the cached path, so greedy near-ties
    can differ."""

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
    if steps < cfg.max_new_tokens:
        say(f"note: max_new_tokens {cfg.max_new_tokens} capped at {steps}: a prompt of {prompt.shape[1]} tokens and "
            f"the model's context (max_seq_len) of {model.cfg.max_seq_len}")
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    with _decoding_steps(model, prompt, prompt.shape[1] + steps, cfg, use_cache) as next_logits:
        step_input = prompt
        for _ in range(steps):
            logits = next_logits(tokens, step_input)
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


@contextmanager
def _decoding_steps(model: Decoder, prompt: torch.Tensor, length: int, cfg: SamplingConfig,
                    use_cache: bool) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """What one decoding step runs, for one generation: (every token so far (B, t), the new ones) ->
    next-token logits (B, V). Only the last position is projected: (B, V), not (B, T, V)."""
    if not use_cache:  # the plain path the others are checked against: the whole context every step
        if cfg.static_cache or cfg.compile:
            say("note: static_cache and compile need the KV cache; decoding without it, uncompiled")
        yield lambda tokens, new: model.logits(model(tokens)[:, -1])
    elif cfg.static_cache or cfg.compile:
        decoding = StaticDecoding(model, prompt.shape[0], length, cfg.window_cache, cfg.compile, prompt.device)
        try:
            yield decoding
        finally:
            decoding.release()
    else:
        cache = model.new_cache(prompt.shape[0], length, ring=cfg.window_cache)
        yield lambda tokens, new: model.logits(model(new, cache=cache)[:, -1])


# ---------------------------------------------------------------- static (compiled) decoding, issue 17

# The static step's cache is allocated by this many tokens at a time (up to max_seq_len), so that
# generations of different lengths share one compiled step (and one set of CUDA graphs).
STATIC_CACHE_BUCKET = 256


def _static_step(model: Decoder, input_ids: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) for one new token per row (B, 1): the function torch.compile traces."""
    return model.logits(model.decode_step(input_ids, cache, position)[:, -1])


@functools.cache
def compiled_static_step(device_type: str) -> Callable:
    """`_static_step` compiled once per process and device type; dynamo keeps one graph per model and
    shape set. On CUDA, mode reduce-overhead replays the step as CUDA graphs: decoding a small model on
    a GPU is bound by kernel launches, not FLOPs. On CPU inductor's default mode fuses the elementwise
    work and drops most per-op Python overhead. fullgraph: a graph break is an error, never a silent
    half-compiled step."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(_static_step, mode=mode, fullgraph=True)


# A compiled step keeps its cache from one generation to the next (per model, the latest shape only):
# CUDA graphs record the cache's addresses, and new buffers every generation would re-record them. A
# generation that starts while another one on the same model holds that cache (a callback that
# generates, another thread) gets a cache of its own instead, so neither overwrites the other.
_static_caches: "weakref.WeakKeyDictionary[Decoder, tuple[tuple, KVCache]]" = weakref.WeakKeyDictionary()
_caches_in_use: set[int] = set()  # id() of kept caches a generation holds
_kept_lock = threading.Lock()


class StaticDecoding:
    """Prefill, then one-token steps with fixed shapes. The prompt goes through the ordinary cached
    forward (its length differs from call to call); every later step goes through `Decoder.decode_step`
    with the position as a 0-dim tensor on the device, compiled with `compile`. The cache holds
    `length` tokens rounded up to STATIC_CACHE_BUCKET (at most max_seq_len)."""

    def __init__(self, model: Decoder, batch_size: int, length: int, ring: bool, compile: bool,
                 device: torch.device):
        self.model, self.device = model, device
        max_len = max(length, min(-(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET, model.cfg.max_seq_len))
        self.cache = self._cache(batch_size, max_len, ring, compile)
        self.step = compiled_static_step(device.type) if compile else _static_step
        self.graphs = compile and device.type == "cuda"
        self.position: torch.Tensor | None = None

    def _cache(self, batch_size: int, max_len: int, ring: bool, compile: bool) -> KVCache:
        self.held = None
        if not compile:
            return self.model.new_cache(batch_size, max_len, ring=ring)
        weight = self.model.embed.weight
        key = (batch_size, max_len, ring, weight.dtype, weight.device)
        with _kept_lock:
            kept_key, cache = _static_caches.get(self.model, (None, None))
            if cache is not None and id(cache) in _caches_in_use:  # another generation is using it
                return self.model.new_cache(batch_size, max_len, ring=ring)
            if kept_key != key:
                _static_caches.pop(self.model, None)  # free the old buffers before allocating new ones
                cache = self.model.new_cache(batch_size, max_len, ring=ring)
                if self.device.type == "cuda":  # CUDA graphs may then write the buffers in place (no copies)
                    for buffer in cache.keys + cache.values:
                        torch._dynamo.mark_static_address(buffer)
                _static_caches[self.model] = (key, cache)
            _caches_in_use.add(id(cache))
            self.held = cache
        cache.position = 0  # what an earlier generation left beyond the prompt is masked, then overwritten
        return cache

    def release(self) -> None:
        """The generation is over: the kept cache is free for the next one."""
        if self.held is not None:
            with _kept_lock:
                _caches_in_use.discard(id(self.held))
            self.held = None

    def __call__(self, tokens: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.position is None:  # the prompt: the ordinary cached forward fills the same buffers
            logits = self.model.logits(self.model(new, cache=self.cache)[:, -1])
            self.position = torch.tensor(self.cache.position, device=self.device)
            return logits
        if self.graphs:  # a new replay may overwrite the last step's logits: next_token has read them
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(self.model, new, self.cache, self.position)
        self.position += 1
        self.cache.position += 1
        return logits


def _generate_encdec(model, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None,
                     on_token: Callable[[int], None] | None, use_cache: bool) -> torch.Tensor:
    from slmforge.seq2seq_generate import Seq2SeqConfig, generate_seq2seq

    applicable_switches(model, cfg)  # says that compile / static_cache do not apply here
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
                  out=None, add_bos: bool = True, stop_id: int | None = None,
                  on_empty: Callable[[list[int]], None] | None = None) -> str:
    """Continue a text prompt; with `stream`, characters are written to `out` as they are decoded.

    `add_bos` must match how the model was trained (the checkpoint's meta.json records it); `stop_id`
    ends the answer (default: eos; a chat model's end-of-turn token). `on_empty` is called with the
    generated ids (the stop token included) when they decode to no text, or when the stop token ended
    the answer within SHORT_ANSWER tokens (`why_no_text` says which)."""
    stop_id = stop_id if stop_id is not None else tokenizer.eos_id
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if family(model.cfg).kind == "encoder-decoder":  # a source as span corruption made them: text eos
        ids = ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    elif add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if not ids:  # the model needs at least one token to continue from
        raise SlmforgeError(f"the prompt {prompt[:60]!r} encodes to no tokens and no bos token goes before it: "
                            f"nothing to generate from; give a prompt with text")
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    on_token = None
    if stream:
        decoder = tokenizer.decode_stream()

        def write_piece(token_id: int) -> None:
            piece = decoder.step(token_id)
            if piece:
                (out or sys.stdout).write(piece)  # looked up now: a default bound at import goes stale
                (out or sys.stdout).flush()

        on_token = write_piece

    tokens = generate_ids(model, prompt_ids, cfg, eos_id=stop_id, on_token=on_token)
    generated = new = tokens[0, len(ids):].tolist()
    if stop_id is not None and stop_id in new:
        new = new[:new.index(stop_id)]
    text = tokenizer.decode(new)
    stopped_early = stop_id is not None and len(new) < len(generated) and len(new) < SHORT_ANSWER
    if on_empty is not None and (not text.strip() or stopped_early):
        on_empty(generated)
    return text


# A reply the stop token ends within this many tokens gets a note: a small fine-tuned run answering
# just "How" looks like a bug unless the user learns the model chose to stop there (issue 23).
SHORT_ANSWER = 3


def why_no_text(generated: list[int], tokenizer, meta: dict, stop_id: int | None) -> str:
    """One line on why a generation decoded to no text (what `slmforge generate` says on stderr)."""
    objective = (meta.get("objective") or {}).get("kind")
    if objective == "span" and not meta.get("finetune") and tokenizer.sentinels:
        return (f"note: a span-corruption model answers with sentinels ({tokenizer.sentinels[0]} ...), which are "
                f"not text; fine-tune it (finetune.task = \"translate\") to generate text")
    if generated and stop_id is not None and generated[0] == stop_id:
        which = "end-of-sequence" if stop_id == tokenizer.eos_id else "end-of-turn"
        return (f"note: the model ended at once: its first token was the {which} token "
                f"{tokenizer.id_to_token(stop_id)} (stop_at_eos=false generates past it)")
    if stop_id is not None and stop_id in generated and generated.index(stop_id) > 0:
        count = generated.index(stop_id)
        text = tokenizer.decode(generated[:count])
        if text.strip():
            return (f"note: the model ended its answer after {count} token{'s' * (count > 1)} with "
                    f"{tokenizer.id_to_token(stop_id)}: it chose to stop there (a longer-trained run writes more; "
                    f"stop_at_eos=false generates past it)")
    pieces = [tokenizer.id_to_token(i) for i in generated[:4] if i != stop_id]
    return (f"note: the {len(generated)} generated token(s) decode to no text (special tokens or whitespace: "
            f"{' '.join(str(p) for p in pieces)}{' ...' if len(generated) > 4 else ''})")


# ---------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model (KV cache, streaming)",
                       description="Generate text from a run or checkpoint folder. Sampling fields: "
                                   "max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed; "
                                   "threads, window_cache, static_cache, compile (compile=true: a compiled "
                                   "decoding step, CUDA graphs on GPUs; the first generation pays the compile).")
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


def applicable_switches(model, sampling: SamplingConfig) -> SamplingConfig:
    """`sampling` with the decoding switches this model cannot use cleared, saying so once (and, for
    compile, that the first generation pays the compile)."""
    if not (sampling.compile or sampling.static_cache):
        return sampling
    if family(model.cfg).kind == "encoder-decoder":
        say("note: static_cache and compile apply to decoder-only models; the encoder-decoder decodes with "
            "its own cache, uncompiled")
        return replace(sampling, compile=False, static_cache=False)
    if sampling.compile:
        say("note: compile=true: the first generation compiles the decoding step (seconds to a minute)")
    return sampling


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
    sampling = applicable_switches(model, sampling)  # said before any text is written
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

    def explain(generated: list[int]) -> None:  # one line on stderr, after the (empty) text
        sys.stdout.flush()
        say(why_no_text(generated, tokenizer, meta, stop_id if stop_id is not None else tokenizer.eos_id))

    for prompt, text_in in zip(prompts, inputs):
        for i in range(args.num_samples):
            # sample i of every prompt uses seed + i: the same prompt and seed give the same text
            sampling.seed = None if base_seed is None else base_seed + i
            if args.json:
                text = generate_text(model, tokenizer, text_in, sampling, add_bos=add_bos, stop_id=stop_id,
                                     on_empty=explain)
                results.append({"prompt": prompt, "sample": i, "seed": sampling.seed, "completion": text})
                continue
            if not args.chat:  # a continuation reads on from its prompt; a chat answer stands alone
                sys.stdout.write(prompt)
            generate_text(model, tokenizer, text_in, sampling, stream=True, add_bos=add_bos, stop_id=stop_id,
                          on_empty=explain)
            sys.stdout.write("\n\n")
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0
