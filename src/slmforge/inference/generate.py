"""The function API of generation (`generate_ids`, `generate_text`), a thin user of the inference engine
(docs/inference.md); the `generate` verb is in inference/commands.py."""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import fields, replace
from typing import Callable

import torch

from slmforge.checkpoint.meta import CheckpointMeta
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.inference import Engine, PromptFormat, SamplingParams, TextStream
from slmforge.inference.decoding import (  # noqa: F401 - re-exported: benchmarks and eval import them from here
    SINGLE_THREAD_STEP_FLOPS,
    compiled_static_step,
    cpu_threads,
    decode_threads,
    static_step,
)
from slmforge.inference.sampling import (  # noqa: F401 - re-exported
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_token,
)
from slmforge.models import Decoder
from slmforge.models.registry import family

__all__ = ["SINGLE_THREAD_STEP_FLOPS", "SamplingConfig", "apply_repetition_penalty", "apply_top_k", "apply_top_p",
           "applicable_switches", "compiled_static_step", "cpu_threads", "decode_threads", "generate_ids",
           "generate_text", "next_token", "read_prompt", "why_no_text"]

SamplingConfig = SamplingParams
"""The `generate` verb's config: the engine's SamplingParams (the same fields and defaults)."""

_static_step = static_step  # the step compile=true compiles (tests compile it with their own backend)


# ---------------------------------------------------------------- ids in, ids out


@torch.no_grad()
def generate_ids(model: Decoder, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None = None,
                 on_token: Callable[[int], None] | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `prompt` (B, T) and return (B, T + new); a row that stopped at `eos_id` is filled with
    eos after it. `on_token` sees batch row 0's tokens as they come. Every row uses `cfg` (its seed
    included: equal rows give equal samples). An engine per call (kept between calls with compile,
    whose compiled step and cache are worth keeping); hold an `Engine` to batch prompts of different
    lengths.

    An encoder-decoder reads `prompt` as its source and returns the source followed by the target
    (see `inference.seq2seq` for beams and the cached cross-attention)."""
    if family(model.cfg).kind == "encoder-decoder":
        return _generate_encdec(model, prompt, cfg, eos_id, on_token, use_cache)
    if family(model.cfg).kind != "decoder":
        raise SlmforgeError(f"model family {model.cfg.family!r} is an encoder: it fills masks rather than "
                            f"continuing text; use `slmforge fill-mask`")
    if not use_cache and (cfg.static_cache or cfg.compile):
        say("note: static_cache and compile need the KV cache; decoding without it, uncompiled")
    batch, length = prompt.shape
    room = model.cfg.max_seq_len - length
    if room <= 0:
        raise SlmforgeError(f"prompt of {length} tokens leaves no room to generate: the model's "
                            f"context (max_seq_len) is {model.cfg.max_seq_len} tokens")
    steps = min(cfg.max_new_tokens, room)
    if steps < cfg.max_new_tokens:
        say(f"note: max_new_tokens {cfg.max_new_tokens} capped at {steps}: a prompt of {length} tokens and "
            f"the model's context (max_seq_len) of {model.cfg.max_seq_len}")
    params = replace(cfg, max_new_tokens=steps, stop=[],
                     stop_token_ids=[eos_id] if eos_id is not None and cfg.stop_at_eos else [])
    rows = prompt.tolist()
    with _engine_for(model, batch, length + steps, params, use_cache, prompt.device) as engine:
        if on_token is None:
            generated = [c.token_ids for c in engine.generate(rows, params)]
        else:
            generated = [[] for _ in rows]
            for event in engine.stream(rows, params):
                if event.token_id is None:
                    continue
                generated[event.request_id].append(event.token_id)
                if event.request_id == 0 and event.token_id != eos_id:
                    on_token(event.token_id)
    width = max(len(ids) for ids in generated)
    fill = eos_id if eos_id is not None else 0
    out = torch.full((batch, length + width), fill, dtype=torch.long, device=prompt.device)
    out[:, :length] = prompt
    for i, ids in enumerate(generated):
        out[i, length:length + len(ids)] = torch.tensor(ids, dtype=torch.long, device=prompt.device)
    return out


# The engines generate_ids keeps for compile=true, one per model (the latest shape only): a compiled step
# keeps its cache from one generation to the next (CUDA graphs record the cache's addresses). A
# generation that starts while another holds the kept engine (a callback that generates, another
# thread) gets an engine of its own. An Engine the caller holds needs none of this.
_static_caches: "weakref.WeakKeyDictionary[Decoder, tuple[tuple, Engine]]" = weakref.WeakKeyDictionary()
_caches_in_use: set[int] = set()  # id() of kept engines a generation holds
_kept_lock = threading.Lock()

# The compiled step's cache holds this many tokens at a time (up to max_seq_len), so that generations of
# different lengths share one compiled step (and one set of CUDA graphs).
STATIC_CACHE_BUCKET = 256


class _engine_for:
    """An engine for one generate_ids call (with compile, the kept one when it is free)."""

    def __init__(self, model, batch: int, length: int, cfg: SamplingConfig, use_cache: bool, device):
        self.held = None
        options = dict(device=device, max_batch=batch, threads=cfg.threads, window_cache=cfg.window_cache,
                       static_cache=cfg.static_cache, compile=cfg.compile, use_cache=use_cache)
        if not (cfg.compile and use_cache):
            self.engine = Engine(model, max_len=length, **options)
            return
        bucket = max(length, min(-(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET, model.cfg.max_seq_len))
        weight = model.embed.weight
        key = (batch, bucket, cfg.window_cache, weight.dtype, weight.device)
        with _kept_lock:
            kept_key, engine = _static_caches.get(model, (None, None))
            if engine is not None and id(engine) in _caches_in_use:  # another generation is using it
                self.engine = Engine(model, max_len=bucket, step_compiler=compiled_static_step, **options)
                return
            if kept_key != key:
                _static_caches.pop(model, None)  # free the old buffers before allocating new ones
                engine = Engine(model, max_len=bucket, step_compiler=compiled_static_step, **options)
                _static_caches[model] = (key, engine)
            _caches_in_use.add(id(engine))
            self.engine = self.held = engine

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc) -> None:
        if self.held is not None:
            with _kept_lock:
                _caches_in_use.discard(id(self.held))


def _generate_encdec(model, prompt: torch.Tensor, cfg: SamplingConfig, eos_id: int | None,
                     on_token: Callable[[int], None] | None, use_cache: bool) -> torch.Tensor:
    from slmforge.inference.seq2seq import Seq2SeqConfig, generate_seq2seq

    applicable_switches(model, cfg)  # says that compile / static_cache do not apply here
    shared = {f.name: getattr(cfg, f.name) for f in fields(SamplingParams)}
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
                  on_empty: Callable[[list[int]], None] | None = None, details: dict | None = None) -> str:
    """Continue a text prompt; with `stream`, characters are written to `out` as they are decoded.

    `add_bos` must match how the model was trained (the checkpoint's meta.json records it); `stop_id`
    ends the answer (default: eos; a chat model's end-of-turn token). `on_empty` is called with the
    generated ids (the stop token included) when they decode to no text, or when the stop token ended
    the answer within SHORT_ANSWER tokens (`why_no_text` says which). `details`, if given, receives the
    engine's finish_reason ("stop" or "length"), prompt_tokens and completion_tokens (the stop token counted)."""
    stop_id = stop_id if stop_id is not None else tokenizer.eos_id
    device = next(model.parameters()).device
    layout = PromptFormat(tokenizer, add_bos=add_bos, source_eos=family(model.cfg).kind == "encoder-decoder")
    ids = layout.encode(prompt)
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    on_token = None
    if stream:  # whole characters and grapheme clusters only (see inference/text.py)
        pieces = TextStream(tokenizer)

        def write(piece: str) -> None:
            if piece:
                (out or sys.stdout).write(piece)  # looked up now: a default bound at import goes stale
                (out or sys.stdout).flush()

        on_token = lambda token_id: write(pieces.add(token_id))  # noqa: E731

    tokens = generate_ids(model, prompt_ids, cfg, eos_id=stop_id, on_token=on_token)
    if stream:
        write(pieces.finish())
    generated = new = tokens[0, len(ids):].tolist()
    if stop_id is not None and stop_id in new:
        new = new[:new.index(stop_id)]
    if details is not None:
        details.update(finish_reason="stop" if len(new) < len(generated) else "length", prompt_tokens=len(ids),
                       completion_tokens=len(new) + (len(new) < len(generated)))
    text = tokenizer.decode(new)
    stopped_early = stop_id is not None and len(new) < len(generated) and len(new) < SHORT_ANSWER
    if on_empty is not None and (not text.strip() or stopped_early):
        on_empty(generated)
    return text


# A reply the stop token ends within this many tokens gets a note: a small fine-tuned run answering
# just "How" looks like a bug unless the user learns the model chose to stop there (issue 23).
SHORT_ANSWER = 3


def why_no_text(generated: list[int], tokenizer, info: CheckpointMeta, stop_id: int | None) -> str:
    """One line on why a generation decoded to no text (what `slmforge generate` says on stderr); `info`
    is the run's record (run.info)."""
    if info.objective_kind == "span" and info.finetune is None and tokenizer.sentinels:
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


def read_prompt(stdin) -> str:
    """The prompt from standard input, less one final newline; on a terminal, say so first (otherwise
    the command just waits)."""
    if stdin.isatty():
        print("reading the prompt from standard input (Ctrl-D to end; or pass -p \"prompt\")",
              file=sys.stderr, flush=True)
    text = stdin.read()
    # `echo "prompt" |` ends the prompt with the newline echo adds: not part of what the user typed
    return text[:-1] if text.endswith("\n") else text


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
