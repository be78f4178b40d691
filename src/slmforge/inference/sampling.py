"""SamplingParams, the one description of how to continue a prompt, and the rule that picks a token.

Every generating verb reads these fields with these defaults: `slmforge generate` (as its config,
`SamplingConfig`), the engine (`inference.engine`), encoder-decoder search (`Seq2SeqConfig` adds the
beam fields), translation, evaluation and the server. The defaults decode greedily (temperature 0):
the same prompt gives the same text unless a caller asks for sampling, as transformers' `generate`
does; `slmforge generate temperature=0.8` samples.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import torch

from slmforge.config import require


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    """Tokens to generate at most (`max_tokens`, the OpenAI name, is accepted too)."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy (always the most likely token), the default everywhere."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches p (1 = off)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the context (CTRL-style: divide positive logits, multiply negative)."""
    stop_at_eos: bool = True
    """Stop a sequence at the end-of-sequence token (and at a chat run's end-of-turn token); false
    generates past them (the opposite of vLLM's ignore_eos)."""
    seed: int | None = None
    """Seed for sampling; the same seed, model and prompt give the same text, whatever else shares the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: the text ends before the first one the generation writes (it is not included)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """More token ids that end a sequence (as eos does, the token itself is not part of the text)."""
    threads: int = 0
    """CPU intra-op threads while decoding; 0 = choose: one thread when a decoding step is small (see
    `decode_threads`), else torch's default. Ignored on GPUs. An engine takes it when it is built."""
    window_cache: bool = True
    """Sliding-window layers cache only their window (a ring) and attend to it alone; false keeps every
    token on every layer (same tokens, slower and larger on long contexts). An engine-wide switch."""
    static_cache: bool = False
    """Decode with fixed shapes: after the prompt, each step attends to the whole preallocated cache through
    a mask computed from the position held on the device (`Decoder.decode_step`). Same tokens; on its own
    no faster (it attends to unused slots too): it is the step `compile` compiles, kept to check it."""
    compile: bool = False
    """Compile the static decoding step (implies static_cache) with torch.compile: CUDA graphs on GPUs
    (mode reduce-overhead), inductor's default mode on CPU. The first generation pays the compile (10-20 s
    for a tiny model on CPU); later ones of the same engine reuse it. Same tokens as the default path in
    float32 (tested); in bf16 the masked attention over the whole buffer may round differently from the
    cached path, so greedy near-ties can differ."""
    max_tokens: InitVar[int | None] = None

    def __post_init__(self, max_tokens: int | None) -> None:
        if max_tokens is not None:
            self.max_new_tokens = max_tokens
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])  # OpenAI allows one string
        self.stop_token_ids = list(self.stop_token_ids or [])

    @classmethod
    def expand_config(cls, data: dict) -> dict:
        """`max_tokens = n` in a config or override is `max_new_tokens = n`."""
        if "max_tokens" in data:
            data = dict(data)
            value = data.pop("max_tokens")
            data.setdefault("max_new_tokens", value)
        return data

    def validate(self) -> None:
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.threads >= 0, "threads", f"must be >= 0 (0 = choose), got {self.threads}")
        require(self.repetition_penalty > 0, "repetition_penalty",
                f"must be positive, got {self.repetition_penalty}")
        require(all(self.stop), "stop", "an empty stop string would stop before any text")

    @property
    def greedy(self) -> bool:
        """The choice is the argmax of the raw logits: no draw, no penalty."""
        return self.temperature == 0 and self.repetition_penalty == 1.0


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


def next_token(logits: torch.Tensor, context: torch.Tensor, cfg: SamplingParams,
               generator: torch.Generator | None) -> torch.Tensor:
    """Choose the next token (B,) from last-position logits (B, V); `context` (B, T) is what the
    repetition penalty looks at."""
    logits = apply_repetition_penalty(logits.float(), context, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
