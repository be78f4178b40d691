"""The inference engine of decoder-only models: batched prompts of different lengths, per-request
sampling and stops, streaming text, and continuous batching, over caches the engine owns.

Layout of the cache (one `KVCache` of `max_batch` rows and up to `max_len` columns, owned by the engine,
allocated for what the requests need and grown as they need more):
- Rows are slots. Active requests occupy rows 0..n-1 (when one leaves, the last row moves into its
  slot), so a decoding step runs on the first n rows only.
- Columns are aligned on the right ("left padding"): every active row's newest token sits in the same
  column `col`, and a row's earlier tokens fill the columns before it; what lies before a row's first
  token is padding, hidden by `mask` (rows x columns, True = a token of that row). Positions (RoPE)
  count a row's own tokens (the decoder derives them from the mask), so a row's values do not depend on
  where its tokens sit. One decoding step feeds each row's newest token at column `col`.
- A request joins at a step boundary: its prompt runs through the model alone (or with the others
  joining at the same step, left-padded to one length) into a temporary cache, whose keys and values
  are copied into its slot, ending at column `col`. When `col` would pass the end of the buffer, or a
  prompt is longer than `col`, the whole buffer shifts by whole columns (rings of sliding-window
  layers roll), which keeps every row's tokens in order.
- With `static_cache` / `compile`, each step runs `Decoder.decode_step` on all `max_batch` rows over
  the whole buffer with the mask as key padding: every shape fixed, so a compiled step (CUDA graphs on
  GPUs) is traced once per engine.

Each request has its own stop tokens, stop strings, token budget and random generator (seeded from its
`seed`), so its tokens do not depend on what else shares the batch: greedy tokens equal those it gets
alone up to floating-point rounding of the batched matmuls (tested equal in float32), and seeded
samples too (a row draws from its own generator).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.inference.decoding import compiled_static_step, decode_threads, static_step
from slmforge.inference.prompt import PromptFormat
from slmforge.inference.sampling import SamplingParams, next_token
from slmforge.inference.text import TextStream
from slmforge.models import KVCache
from slmforge.models.registry import family

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")

# The cache grows by this many columns at least (up to max_len), so that a compiled step sees few shapes.
COLUMN_BUCKET = 256


@dataclass
class Completion:
    """One finished generation."""
    token_ids: list[int]
    """The generated ids, the stop token that ended it included (it is not part of `text`)."""
    text: str
    """The generated text, cut before a stop string; "" without a tokenizer."""
    finish_reason: str
    """"stop" (a stop token or string), "length" (max_new_tokens or the context), "cancelled", "error"."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamEvent:
    """One step of one request. `request_id` is the request's id (`submit`), or its index in the list
    given to `stream`. `token_id` is the token chosen this step (None on a final event without one:
    cancelled, closed, failed); `text` is the newly final text (maybe ""). The last event of a request
    has `finish_reason` set."""
    request_id: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Request:
    """A submitted request: read its events with `events()` (unless `on_event` was given), end it early
    with `cancel()`. `completion` is set once it has finished."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams,
                 on_event: Callable[[StreamEvent], None] | None, engine: "Engine", quiet: bool = False):
        self.id, self.prompt, self.params = request_id, list(prompt), params
        self._on_event = on_event
        self._queue: queue.Queue | None = None if (on_event is not None or quiet) else queue.Queue()
        self._engine = engine
        self.cancelled = False
        self.say_capped = False  # say on stderr when the context, not max_new_tokens, ended it
        self.done = threading.Event()
        self.completion: Completion | None = None

    def events(self) -> Iterator[StreamEvent]:
        """The request's events as they come (blocking); ends after the one with finish_reason."""
        if self._queue is None:
            raise SlmforgeError("this request delivers its events to on_event; events() has nothing to read")
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Free its slot at the next step boundary; its last event then says "cancelled"."""
        self.cancelled = True
        self._engine._wake()

    def _emit(self, event: StreamEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's failure must not stop the other requests
                log.exception("on_event of request %d failed", self.id)
        elif self._queue is not None:
            self._queue.put(event)
        if event.finish_reason is not None:
            self.done.set()


@dataclass
class _Row:
    """A request in a slot: what decoding it needs."""
    request: Request
    max_new: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    text: TextStream | None
    cached: int  # tokens of this row in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.request.prompt + self.generated


class Engine:
    """Generate with a decoder-only model: `generate` / `stream` for a list of prompts, `start` +
    `submit` for requests that come and go (continuous batching, for a server).

    `prompt_format` (or `tokenizer`) gives the text side: decoding, and the stop tokens of the run (eos,
    a chat run's end of turn) that every request stops at unless its `stop_at_eos` is false. Without a
    tokenizer the engine works on ids alone (texts are "")."""

    def __init__(self, model, tokenizer=None, prompt_format: PromptFormat | None = None,
                 device: torch.device | str | None = None, max_batch: int = 8, max_len: int | None = None,
                 threads: int = 0, window_cache: bool = True, static_cache: bool = False, compile: bool = False,
                 use_cache: bool = True, step_compiler: Callable[[str], Callable] | None = None):
        kind = family(model.cfg).kind
        if kind != "decoder":
            raise SlmforgeError(f"the engine decodes with decoder-only models; {model.cfg.family!r} is an {kind}")
        if max_batch < 1:
            raise SlmforgeError(f"max_batch: must be at least 1, got {max_batch}")
        self.model = model.eval()
        self.prompt_format = prompt_format
        self.tokenizer = tokenizer if tokenizer is not None else getattr(prompt_format, "tokenizer", None)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch = max_batch
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.threads = threads
        self.window_cache = window_cache
        self.static = (static_cache or compile) and use_cache
        self.compile = compile and use_cache
        self.use_cache = use_cache
        self._step_compiler = step_compiler or compiled_static_step
        self._step_fn: Callable | None = None
        # the batch (touched by one driver at a time: the engine thread, or a caller of generate/stream)
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None
        self.position: torch.Tensor | None = None  # col as a device tensor, for the static step
        self.width = 0  # columns allocated (grown up to max_len)
        self.col = 0
        self.rows: list[_Row] = []
        self._waiting: list[Request] = []  # queued; a joining request leaves it once it has its row
        self._base_threads: int | None = None  # CPU: torch's threads when the drive began (None: leave them)
        self._one_thread_below = 1  # tokens per step under which a step runs on one thread
        self._drive = threading.Lock()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()

    # ------------------------------------------------------------ offline: a list of prompts

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Complete every prompt (ids); rows of different lengths share batches of up to max_batch."""
        requests = self._requests(prompts, params, quiet=True)
        self._run(requests)
        return [r.completion for r in requests]

    def stream(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StreamEvent]:
        """Events of every prompt as they come; `request_id` is the prompt's index."""
        events: queue.Queue = queue.Queue()
        requests = self._requests(prompts, params, on_event=events.put)
        if self.running:
            for request in requests:
                self._enqueue(request)
            try:
                finished = 0
                while finished < len(requests):
                    event = events.get()
                    finished += event.finish_reason is not None
                    yield event
            finally:  # a consumer that stops reading ends what it no longer reads
                for request in requests:
                    if not request.done.is_set():
                        request.cancel()
            return
        with self._drive, self._threads():
            self._waiting.extend(requests)
            try:
                while not all(r.done.is_set() for r in requests):
                    self._step()
                    while not events.empty():
                        yield events.get()
            finally:
                for request in requests:
                    request.cancelled = request.cancelled or not request.done.is_set()
                self._drop_cancelled()
        while not events.empty():
            yield events.get()

    def _requests(self, prompts, params, on_event=None, quiet=False) -> list[Request]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise SlmforgeError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p in params:
            p.validate()
        requests = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_prompt(prompt)
            requests.append(Request(index, prompt, p, on_event, self, quiet=quiet))
            requests[-1].say_capped = True  # (a server tells its client through finish_reason instead)
        return requests

    def _run(self, requests: list[Request]) -> None:
        if self.running:
            for request in requests:
                self._enqueue(request)
            for request in requests:
                request.done.wait()
            return
        with self._drive, self._threads():
            self._waiting.extend(requests)
            while not all(r.done.is_set() for r in requests):
                self._step()

    @contextmanager
    def _threads(self):
        """Around a drive of the batch: each step then picks its CPU threads (`_use_threads`), and
        torch's setting is restored after. (torch's thread count is process-wide: two engines that
        decode on CPU at once set it in turn.)"""
        if self.device.type != "cpu":
            yield
            return
        base = self._base_threads = torch.get_num_threads()
        self._one_thread_below = self._single_thread_tokens(base)
        try:
            yield
        finally:
            self._base_threads = None
            if torch.get_num_threads() != base:
                torch.set_num_threads(base)

    def _single_thread_tokens(self, base: int) -> int:
        """The fewest tokens per step for which decode_threads gives more than one thread (it grows with
        a step's FLOPs), asked while torch's setting is still `base` (decode_threads answers "torch's
        current setting" above its bound, which is 1 once a step has set it); 1 when every step gets
        `base`."""
        if self.threads or base == 1 or decode_threads(self.model, 1, self.device) > 1:
            return 1
        low, high = 1, 2  # decode_threads(low) is 1
        while decode_threads(self.model, high, self.device) == 1:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if decode_threads(self.model, middle, self.device) == 1 else (low, middle)
        return high

    def _use_threads(self, tokens: int) -> None:
        """CPU threads for a step over `tokens` tokens (the rows decoding, or the prompt tokens of a
        prefill): `threads` when set, else one below decode_threads' FLOPs bound and torch's own setting
        above it. A batch that shrinks to a few rows drops to one thread; torch.set_num_threads is called
        only when the choice changes."""
        if self._base_threads is None:
            return
        want = self.threads or (1 if tokens < self._one_thread_below else self._base_threads)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise SlmforgeError("the prompt has no tokens: nothing to generate from")
        if len(prompt) >= self.max_len:
            raise SlmforgeError(f"prompt of {len(prompt)} tokens leaves no room to generate: the model's "
                                f"context (max_seq_len) is {self.max_len} tokens")
        vocab = self.model.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise SlmforgeError(f"the prompt has token ids outside the model's vocabulary (0..{vocab - 1})")

    # ------------------------------------------------------------ continuous batching

    @property
    def active(self) -> int:
        """Requests in the batch now (each in a slot). A request has left it before its last event is
        delivered, so a reader that saw "finished" does not count it here."""
        return len(self.rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot (a joining one counts here until its row is in the batch)."""
        return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the decoding loop in a background thread (idempotent)."""
        if self._closed:
            raise SlmforgeError("the engine is closed")
        if self.running:
            return
        self._thread = threading.Thread(target=self._loop, name="slmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_event: Callable[[StreamEvent], None] | None = None) -> Request:
        """Queue a request; it joins the running batch at the next step boundary (call `start` first).
        `on_event` is called from the engine thread; without it read `request.events()`."""
        if self._closed:
            raise SlmforgeError("the engine is closed")
        params = params or SamplingParams()
        params.validate()
        self._check_prompt(prompt_ids)
        request = Request(next(self._ids), prompt_ids, params, on_event, self)
        self._enqueue(request)
        return request

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason "cancelled"."""
        self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._drive:
            self._cancel_all("cancelled")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _enqueue(self, request: Request) -> None:
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        with self._drive, self._threads():
            while not self._closed:
                with self._wakeup:
                    while not self._closed and not self.rows and not self._waiting:
                        self._wakeup.wait()
                if self._closed:
                    break
                try:
                    self._step()
                except Exception:  # a failed step fails its requests, not the server
                    log.exception("decoding step failed")
                    self._cancel_all("error")

    def _cancel_all(self, reason: str) -> None:
        with self._wakeup:
            waiting, self._waiting = self._waiting, []
        rows, self.rows = self.rows, []  # out of the batch before their last events
        self.col = 0
        for request in waiting:
            self._finish_request(request, [], "", reason)
        for row in rows:
            self._finish_request(row.request, row.generated, self._final_text(row, None), reason)

    # ------------------------------------------------------------ one step

    @torch.no_grad()
    def _step(self) -> None:
        """Admit waiting requests (prefill, first token), then decode one token for every row."""
        self._drop_cancelled()
        with self._wakeup:  # the first ones queued; they stay in _waiting until they have rows (_prefill)
            joining = self._waiting[:self.max_batch - len(self.rows)]
        if joining:
            self._prefill(joining)
        if self.rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        """End the cancelled requests, each after it has left the batch or the queue."""
        gone = [i for i, row in enumerate(self.rows) if row.request.cancelled]
        rows = [self.rows[i] for i in gone]
        self._remove(gone)
        for row in rows:
            self._finish_request(row.request, row.generated, self._final_text(row, None), "cancelled")
        if not any(r.cancelled for r in self._waiting):
            return
        with self._wakeup:
            cancelled = [r for r in self._waiting if r.cancelled]
            self._waiting = [r for r in self._waiting if not r.cancelled]
        for request in cancelled:
            self._finish_request(request, [], "", "cancelled")

    def _ensure_columns(self, needed: int) -> None:
        """Buffers of at least `needed` columns: allocated for the first requests in COLUMN_BUCKET steps
        (at most max_len), grown and copied when the batch needs more, so that an engine for a model
        of a long context holds what its requests use, not max_batch x max_seq_len."""
        if self.mask is not None and self.width >= needed:
            return
        width = max(needed, 2 * self.width if self.mask is not None else 0)
        width = min(self.max_len, -(-width // COLUMN_BUCKET) * COLUMN_BUCKET)
        mask = torch.zeros(self.max_batch, width, dtype=torch.bool, device=self.device)
        if self.mask is not None:
            mask[:, :self.width] = self.mask
        if self.use_cache:
            cache = self.model.new_cache(self.max_batch, width, ring=self.window_cache)
            if self.cache is not None:
                self._carry(self.cache, cache)
            if self.compile and self.device.type == "cuda":  # CUDA graphs may then write the buffers in place
                for buffer in cache.keys + cache.values:
                    torch._dynamo.mark_static_address(buffer)
            self.cache = cache
        self.mask, self.width = mask, width
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=self.device)

    def _carry(self, old: KVCache, new: KVCache) -> None:
        """The columns in use (..col) of a smaller cache into a larger one; a sliding layer that becomes
        a ring takes its newest `window` columns, each into slot column % window."""
        for layer in range(len(old.keys)):
            for small, big in ((old.keys[layer], new.keys[layer]), (old.values[layer], new.values[layer])):
                if old.ring[layer]:  # a ring stays the same ring
                    big.copy_(small)
                elif new.ring[layer]:
                    columns = torch.arange(max(0, self.col - new.window), self.col, device=self.device)
                    big.index_copy_(2, columns % new.window, small[:, :, columns])
                else:
                    big[:, :, :small.shape[2]] = small

    def _prefill(self, joining: list[Request]) -> None:
        lengths = [len(r.prompt) for r in joining]
        width = max(lengths)
        target = max([width] + [row.cached for row in self.rows])
        # the static step sees the buffer's shape: room for every joining request at once (fewer shapes to
        # compile); the ordinary path grows as decoding goes
        need = max(len(r.prompt) + r.params.max_new_tokens for r in joining) if self.static else target + 1
        self._ensure_columns(max(target, need))
        if not self.rows:
            self.col = target
        elif target != self.col:
            self._shift(target - self.col)
        n, k = len(self.rows), len(joining)
        self._use_threads(k * width)
        ids = torch.zeros(k, width, dtype=torch.long, device=self.device)
        real = torch.zeros(k, width, dtype=torch.bool, device=self.device)
        for i, request in enumerate(joining):
            ids[i, width - len(request.prompt):] = torch.tensor(request.prompt, device=self.device)
            real[i, width - len(request.prompt):] = True
        padding = real if min(lengths) != width else None
        start = self.col - width
        self.mask[n:n + k] = False
        self.mask[n:n + k, start:self.col] = real
        if self.use_cache and n == 0:  # an empty batch: the prompts go straight into rows 0..k-1
            view = self._view(k)
            view.position = 0
            hidden = self.model(ids, attention_mask=padding, cache=view)
        elif self.use_cache:  # a running batch: a scratch cache, then its columns into the joining slots
            scratch = KVCache(len(self.cache.keys), self.cache.keys[0].shape[1], self.cache.keys[0].shape[3], k,
                              width, self.device, self.cache.keys[0].dtype)
            hidden = self.model(ids, attention_mask=padding, cache=scratch)
            self._copy_in(scratch, n, k, start, width)
        else:
            hidden = self.model(ids, attention_mask=padding)
        logits = self.model.logits(hidden[:, -1])
        self.rows.extend(self._row(request) for request in joining)
        with self._wakeup:  # they were the first k queued; other threads only append meanwhile
            del self._waiting[:k]
        self._choose(logits, n)

    def _row(self, request: Request) -> _Row:
        p = request.params
        stops = set(p.stop_token_ids)
        if p.stop_at_eos and self.prompt_format is not None:
            stops.update(self.prompt_format.stop_ids)
        elif p.stop_at_eos and self.tokenizer is not None and self.tokenizer.eos_id is not None:
            stops.add(self.tokenizer.eos_id)
        generator = None
        if p.seed is not None and not p.greedy:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        text = None
        if self.tokenizer is not None and (p.stop or request._queue is not None or request._on_event is not None):
            text = TextStream(self.tokenizer, p.stop)
        return _Row(request, min(p.max_new_tokens, self.max_len - len(request.prompt)), frozenset(stops),
                    generator, text, cached=len(request.prompt))

    def _copy_in(self, scratch: KVCache, n: int, k: int, start: int, width: int) -> None:
        """The scratch cache's keys/values (k rows, `width` columns) into rows n..n+k-1, columns start..col."""
        cache = self.cache
        for layer in range(len(cache.keys)):
            for big, small in ((cache.keys[layer], scratch.keys[layer]), (cache.values[layer], scratch.values[layer])):
                if cache.ring[layer]:  # the newest `window` columns, each in slot column % window
                    keep = min(width, cache.window)
                    slots = torch.arange(self.col - keep, self.col, device=self.device) % cache.window
                    big[n:n + k].index_copy_(2, slots, small[:, :, width - keep:width].to(big.dtype))
                else:
                    big[n:n + k, :, start:self.col] = small[:, :, :width]

    def _shift(self, d: int) -> None:
        """Move every row's tokens d columns right (d < 0: left); the columns vacated become padding."""
        n, length = len(self.rows), self.width
        if self.cache is not None:
            for layer in range(len(self.cache.keys)):
                for buffer in (self.cache.keys[layer], self.cache.values[layer]):
                    if self.cache.ring[layer]:  # column c lives in slot c % window: a roll keeps that true
                        buffer[:n] = torch.roll(buffer[:n], d, dims=2)
                    elif d > 0:
                        buffer[:n, :, d:] = buffer[:n, :, :length - d].clone()
                    else:
                        buffer[:n, :, :length + d] = buffer[:n, :, -d:].clone()
        mask = self.mask[:n].clone()
        self.mask[:n] = False
        if d > 0:
            self.mask[:n, d:] = mask[:, :length - d]
        else:
            self.mask[:n, :length + d] = mask[:, -d:]
        self.col += d

    def _decode(self) -> None:
        if self.col >= self.width and self.width < self.max_len:
            self._ensure_columns(self.col + 1)
        elif self.col >= self.width:  # the buffer is full: drop the columns that are padding for every row
            self._shift(max(row.cached for row in self.rows) - self.col)
        n, col = len(self.rows), self.col
        self._use_threads(n)
        inputs = torch.tensor([[row.generated[-1]] for row in self.rows], device=self.device)
        self.mask[:n, col] = True
        for row in self.rows:
            row.cached += 1
        padded = any(row.cached != col + 1 for row in self.rows)
        if self.static:
            logits = self._static_logits(inputs, n, padded)
        elif self.use_cache:
            view = self._view(n)
            mask = self.mask[:n, :col + 1] if padded else None
            logits = self.model.logits(self.model(inputs, attention_mask=mask, cache=view)[:, -1])
        else:  # the plain path the others are checked against: every row's whole context, every step
            ids = torch.zeros(n, col + 1, dtype=torch.long, device=self.device)
            for i, row in enumerate(self.rows):
                context = row.context
                ids[i, col + 1 - len(context):] = torch.tensor(context, device=self.device)
            mask = self.mask[:n, :col + 1] if padded else None
            logits = self.model.logits(self.model(ids, attention_mask=mask)[:, -1])
        self.col += 1
        self._choose(logits, 0)

    def _view(self, n: int) -> KVCache:
        """The cache's first n rows as a KVCache of their own (views: writes land in the engine's buffers)."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.cache.__dict__)
        view.keys = [k[:n] for k in self.cache.keys]
        view.values = [v[:n] for v in self.cache.values]
        view.position = self.col
        return view

    def _static_logits(self, inputs: torch.Tensor, n: int, padded: bool) -> torch.Tensor:
        if self._step_fn is None:
            self._step_fn = self._step_compiler(self.device.type) if self.compile else static_step
        batch_inputs = inputs
        if n < self.max_batch:  # idle slots decode a dummy token that nothing reads
            batch_inputs = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
            batch_inputs[:n] = inputs
        self.position.fill_(self.col)
        self.cache.position = self.col
        if self.compile and self.device.type == "cuda":  # a new replay may overwrite the last step's logits
            torch.compiler.cudagraph_mark_step_begin()
        key_padding = self.mask if padded else None
        logits = self._step_fn(self.model, batch_inputs, self.cache, self.position, key_padding)
        return logits[:n].clone() if self.compile and self.device.type == "cuda" else logits[:n]

    def _choose(self, logits: torch.Tensor, first: int) -> None:
        """Pick a token for rows first.. (logits (k, V)), deliver it, and retire the rows that ended."""
        rows = self.rows[first:first + logits.shape[0]]
        greedy = [i for i, row in enumerate(rows) if row.request.params.greedy]
        chosen: list[int] = [0] * len(rows)
        if greedy:
            best = logits[greedy].float().argmax(dim=-1).tolist() if len(greedy) < len(rows) else \
                logits.float().argmax(dim=-1).tolist()
            for i, token in zip(greedy, best):
                chosen[i] = token
        for i, row in enumerate(rows):
            if row.request.params.greedy:
                continue
            context = torch.tensor([row.context], device=self.device)
            chosen[i] = int(next_token(logits[i:i + 1], context, row.request.params, row.generator)[0])
        events = [self._deliver(row, token) for row, token in zip(rows, chosen)]
        # rows that ended leave the batch before their last events go out: a consumer that sees
        # "finished" and reads `active` does not count its request any more
        self._remove([first + i for i, event in enumerate(events) if event.finish_reason is not None])
        for row, event in zip(rows, events):
            row.request._emit(event)

    def _deliver(self, row: _Row, token: int) -> StreamEvent:
        """Record `token` for `row`: the event to send its request (finish_reason set when it ended)."""
        row.generated.append(token)
        request, reason, piece = row.request, None, ""
        if token in row.stop_ids:
            reason = "stop"
            piece = row.text.finish() if row.text is not None else ""
        else:
            if row.text is not None:
                piece = row.text.add(token)
            if row.text is not None and row.text.stopped:
                reason = "stop"
            elif len(row.generated) >= row.max_new:
                reason = "length"
                piece += row.text.finish() if row.text is not None else ""
                if request.say_capped and row.max_new < request.params.max_new_tokens:
                    say(f"note: max_new_tokens {request.params.max_new_tokens} capped at {row.max_new}: a prompt of "
                        f"{len(request.prompt)} tokens and the model's context (max_seq_len) of {self.max_len}")
        event = StreamEvent(request.id, token, piece, reason, len(request.prompt), len(row.generated))
        if reason is not None:
            request.completion = Completion(list(row.generated), self._final_text(row, reason), reason,
                                            len(request.prompt), len(row.generated))
        return event

    def _final_text(self, row: _Row, reason: str | None) -> str:
        if row.text is not None:
            return row.text.text
        if self.tokenizer is None:
            return ""
        ids = row.generated[:-1] if row.generated and row.generated[-1] in row.stop_ids else row.generated
        return self.tokenizer.decode(ids)

    def _finish_request(self, request: Request, generated: list[int], text: str, reason: str) -> None:
        if request.done.is_set():
            return
        request.completion = Completion(list(generated), text, reason, len(request.prompt), len(generated))
        request._emit(StreamEvent(request.id, None, "", reason, len(request.prompt), len(generated)))

    def _remove(self, indices: list[int]) -> None:
        """Free the slots of rows `indices`: the last rows move into them, so active rows stay 0..n-1."""
        for index in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if index != last:
                if self.cache is not None:
                    for buffer in self.cache.keys + self.cache.values:
                        buffer[index] = buffer[last]
                self.mask[index] = self.mask[last]
                self.rows[index] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.col = 0
        elif indices and not self.static:  # the longest row left: drop columns of padding everywhere
            longest = max(row.cached for row in self.rows)
            if self.col - longest > max(32, self.col // 2):
                self._shift(longest - self.col)
