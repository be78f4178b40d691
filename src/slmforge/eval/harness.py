"""Benchmarks through EleutherAI's lm-evaluation-harness, run on slmforge's own model and batching.

`slmforge eval RUN --tasks belebele_hin_Deva,xnli_hi` hands lm-eval an `LM` (`harness_lm.SlmforgeLM`)
whose three request types are answered here, in plain PyTorch:

- log-likelihood of continuations (`continuation_logprobs`): requests that share a context (the choices
  of a multiple-choice question) run that context once, left-padded, into a KV cache, which is then
  copied to one row per choice, and only the continuations go through the model again; requests with
  a context of their own run as one right-padded forward over context + continuation. Only the
  positions that predict continuation tokens go through the output layer and the log-softmax.
- rolling log-likelihood (perplexity tasks): lm-eval's own windows (`get_rolling_token_windows`), each
  scored as a (context, continuation) request above.
- generation until a stop sequence (`generate_until`): the inference engine (`Engine.generate`):
  prompts of mixed lengths share its batch (left padding, rows refilled as others end), each with the
  task's stop strings (lm-eval's `until`), eos and max_gen_toks; greedy unless the task samples. Its
  texts equal those of `generate_until_stop`, the plain left-padded loop it replaced, kept as the
  reference (tests/test_lm_eval_harness.py).

Token layout follows lm-eval's HF backend (HFLM), so scores equal `HFLM(pretrained=exported folder)`
on the exported model (tests/test_lm_eval_harness.py): a continuation's tokens are those of
encode(context + continuation) minus encode(context); the run's `add_bos` (meta.json) decides whether a
bos token goes first, as the exported tokenizer's post-processor does for HFLM.

lm-eval is an optional extra: nothing here imports it at module level; `require_lm_eval` says how to
install it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from slmforge.errors import SlmforgeError

INSTALL_HINT = "pip install 'slmforge[eval]'"
MIN_LM_EVAL = (0, 4, 12)  # TaskManager.load and its index of task entries
EVAL_PREFIX = "lm-eval:"  # eval.json keys of harness results: "lm-eval:belebele_hin_Deva"


def require_lm_eval():
    """The lm_eval module, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError as e:
        raise SlmforgeError(f"lm-evaluation-harness is not installed ({e.name or 'lm_eval'} missing); "
                            f"{INSTALL_HINT}") from None
    found = lm_eval_version()
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    if len(parts) == 3 and parts < MIN_LM_EVAL:
        raise SlmforgeError(f"lm-eval {found} is older than {'.'.join(map(str, MIN_LM_EVAL))}, which slmforge's "
                            f"backend needs (TaskManager.load); pip install -U 'slmforge[eval]'")
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- log-likelihood of continuations

# Rows of (positions x vocabulary) log-probabilities computed at once: bounds the memory of a large
# vocabulary (256k ids x 512 rows x 4 bytes = 512 MiB).
LOGIT_ELEMENTS = 1 << 27


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _score(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether target is the argmax, for hidden states (M, H) and targets (M,),
    projected in chunks so that (chunk, vocab) float32 stays bounded."""
    vocab = model.cfg.vocab_size
    step = max(1, LOGIT_ELEMENTS // vocab)
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], step):
        logits = model.logits(hidden[start:start + step]).float()
        chunk = targets[start:start + step]
        # log_softmax at the target alone: its logit minus logsumexp (no (chunk, vocab) result written)
        logprobs.append(logits.gather(-1, chunk[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
        greedy.append(logits.argmax(-1) == chunk)
    return torch.cat(logprobs), torch.cat(greedy)


def _sum_per_item(values: torch.Tensor, greedy: torch.Tensor, lengths: list[int]) -> list[tuple[float, bool]]:
    sums = [float(v.sum()) for v in torch.split(values.double(), lengths)]  # per item, in float64
    flags = [bool(g.all()) for g in torch.split(greedy, lengths)]
    return list(zip(sums, flags))


def split_request(context: Sequence[int], continuation: Sequence[int], max_length: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (prefix, continuation) the model sees for one request: context + continuation cut from the
    left to max_length + 1 tokens (the last token is only predicted), as lm-eval's HF backend cuts it.
    The prefix is what the continuation is conditioned on; it keeps at least one token."""
    if not continuation:
        raise SlmforgeError("lm-eval asked for the log-likelihood of an empty continuation")
    if len(continuation) > max_length:
        raise SlmforgeError(f"a continuation of {len(continuation)} tokens is longer than the model's context "
                            f"({max_length} tokens)")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    return tuple(whole[:-len(continuation)]), tuple(continuation)


@torch.no_grad()
def continuation_logprobs(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                          max_length: int | None = None, pad_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | what precedes them), every token the argmax) per request
    (context ids, continuation ids), as lm-eval's `loglikelihood` wants them. `batch_size` counts
    continuations per forward pass; requests that share a context share one pass over it."""
    max_length = max_length or model.cfg.max_seq_len
    model.eval()
    split = [split_request(c, x, max_length) for c, x in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (prefix, _) in enumerate(split):
        groups.setdefault(prefix, []).append(index)
    # Longest first (as lm-eval orders them): rows of a batch have similar lengths, little padding.
    order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(split[i][1]) for i in g[1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    longest_prefix = longest_cont = count = 0

    def flush():
        if batch:
            for index, value in zip((i for _, items in batch for i in items),
                                    _score_batch(model, batch, split, pad_id)):
                results[index] = value

    for prefix, items in order:
        cont = max(len(split[i][1]) for i in items)
        fits = (count + len(items) <= batch_size
                and max(longest_prefix, len(prefix)) + max(longest_cont, cont) - 1 <= max_length)
        if batch and not fits:
            flush()
            batch, longest_prefix, longest_cont, count = [], 0, 0, 0
        batch.append((prefix, items))
        longest_prefix, longest_cont = max(longest_prefix, len(prefix)), max(longest_cont, cont)
        count += len(items)
    flush()
    return results  # type: ignore[return-value]


def _score_batch(model, batch, split, pad_id: int) -> list[tuple[float, bool]]:
    """Scores of the requests of `batch` [(prefix, [request indices])], in that order."""
    items = [i for _, members in batch for i in members]
    if len(items) == len(batch):  # no context shared: one forward over prefix + continuation[:-1]
        return _score_unshared([split[i] for i in items], model, pad_id)
    return _score_shared(batch, split, model, pad_id)


def _score_unshared(pairs, model, pad_id: int) -> list[tuple[float, bool]]:
    """Right-padded rows prefix + continuation[:-1]; with causal attention the padding after a row's
    tokens changes nothing before it, so no mask is needed (SDPA's is_causal path)."""
    device = _device(model)
    rows = [list(prefix) + list(cont[:-1]) for prefix, cont in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    row_index, positions, targets, lengths = [], [], [], []
    for r, ((prefix, cont), row) in enumerate(zip(pairs, rows)):
        ids[r, :len(row)] = torch.tensor(row)
        row_index += [r] * len(cont)
        positions += range(len(prefix) - 1, len(prefix) - 1 + len(cont))
        targets += cont
        lengths.append(len(cont))
    hidden = model(ids.to(device))
    picked = hidden[torch.tensor(row_index, device=device), torch.tensor(positions, device=device)]
    return _sum_per_item(*_score(model, picked, torch.tensor(targets, device=device)), lengths)


def _score_shared(batch, split, model, pad_id: int) -> list[tuple[float, bool]]:
    """Each distinct prefix once (left-padded, into a KV cache), its last state predicting every
    continuation's first token; the cache copied to one row per continuation, then continuation[:-1]
    (right-padded) on top of it, predicting the rest."""
    device = _device(model)
    prefixes = [prefix for prefix, _ in batch]
    items = [i for _, members in batch for i in members]
    conts = [split[i][1] for i in items]
    group_of = [g for g, (_, members) in enumerate(batch) for _ in members]
    width = max(len(p) for p in prefixes)
    longest = max(len(c) for c in conts)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for g, prefix in enumerate(prefixes):
        ids[g, width - len(prefix):] = torch.tensor(prefix)
        mask[g, width - len(prefix):] = 1
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.tensor(group_of, device=device)
    first_targets = torch.tensor([c[0] for c in conts], device=device)
    if longest == 1:  # one-token continuations: the prefix pass answers them all
        last = model(ids, attention_mask=mask)[:, -1]
        return _sum_per_item(*_score(model, last[rows], first_targets), [1] * len(conts))
    cache = model.new_cache(len(prefixes), width + longest - 1, ring=False)
    last = model(ids, attention_mask=mask, cache=cache)[:, -1]
    expanded = model.new_cache(len(items), width + longest - 1, ring=False)
    for mine, theirs in zip(expanded.keys + expanded.values, cache.keys + cache.values):
        mine[:, :, :width] = theirs[:, :, :width].index_select(0, rows)
    expanded.position = cache.position
    del cache
    steps = torch.full((len(items), longest - 1), pad_id, dtype=torch.long)
    step_mask = torch.zeros((len(items), longest - 1), dtype=torch.long)
    for r, cont in enumerate(conts):
        steps[r, :len(cont) - 1] = torch.tensor(cont[:-1])
        step_mask[r, :len(cont) - 1] = 1
    hidden = model(steps.to(device), attention_mask=torch.cat([mask[rows], step_mask.to(device)], dim=1),
                   cache=expanded)
    row_index, positions, targets = [], [], []
    for r, cont in enumerate(conts):
        row_index += [r] * (len(cont) - 1)
        positions += range(len(cont) - 1)
        targets += cont[1:]
    rest = hidden[torch.tensor(row_index, device=device, dtype=torch.long),
                  torch.tensor(positions, device=device, dtype=torch.long)]
    first_lp, first_greedy = _score(model, last[rows], first_targets)
    rest_lp, rest_greedy = _score(model, rest, torch.tensor(targets, device=device, dtype=torch.long))
    # Reassemble per continuation: its first token, then the rest in order.
    out, offset = [], 0
    for r, cont in enumerate(conts):
        n = len(cont) - 1
        lp = first_lp[r].double() + rest_lp[offset:offset + n].double().sum()
        greedy = bool(first_greedy[r]) and bool(rest_greedy[offset:offset + n].all())
        out.append((float(lp), greedy))
        offset += n
    return out


@torch.no_grad()
def encdec_continuation_logprobs(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                                 batch_size: int = 8, max_length: int | None = None, pad_id: int = 0
                                 ) -> list[tuple[float, bool]]:
    """The same for an encoder-decoder: the context is the source, the continuation the target (teacher
    forcing from the decoder start token), each cut to the last max_length tokens, as lm-eval's HF
    backend does for seq2seq models."""
    max_length = max_length or model.cfg.max_seq_len
    device = _device(model)
    model.eval()
    pairs = [(list(c)[-max_length:], list(x)[-max_length:]) for c, x in requests]
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        sources = [pairs[i][0] for i in chunk]
        targets = [pairs[i][1] for i in chunk]
        src = torch.full((len(chunk), max(map(len, sources))), pad_id, dtype=torch.long)
        src_mask = torch.zeros_like(src)
        tgt = torch.full((len(chunk), max(map(len, targets))), -100, dtype=torch.long)
        for r, (s, t) in enumerate(zip(sources, targets)):
            src[r, :len(s)] = torch.tensor(s)
            src_mask[r, :len(s)] = 1
            tgt[r, :len(t)] = torch.tensor(t)
        src, src_mask, tgt = src.to(device), src_mask.to(device), tgt.to(device)
        hidden = model(src, src_mask, decoder_input_ids=model.shift_right(tgt))
        keep = tgt >= 0
        values = _score(model, hidden[keep], tgt[keep])
        for index, value in zip(chunk, _sum_per_item(*values, [len(t) for t in targets])):
            results[index] = value
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------- generation until a stop string


@torch.no_grad()
def generate_until_stop(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stopped: Callable[[list[int]], bool],
                        eos_id: int | None, sampling=None, pad_id: int = 0, seed: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (a batch, left-padded), ending before eos or when `stopped(new ids)`
    says a stop string has appeared, or after max_new_tokens. The next token is chosen by
    `generate.next_token` (greedy with the default `sampling`)."""
    from slmforge.inference.generate import SamplingConfig, cpu_threads, decode_threads, next_token

    sampling = sampling or SamplingConfig(temperature=0.0)
    device = _device(model)
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(list(prompt))
        mask[r, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    steps = min(max_new_tokens, model.cfg.max_seq_len - width)
    new: list[list[int]] = [[] for _ in prompts]
    if steps <= 0:
        return new
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    done = [False] * len(prompts)
    cache = model.new_cache(len(prompts), width + steps)
    threads = decode_threads(model, len(prompts), device)
    with cpu_threads(threads if device.type == "cpu" else None):
        tokens, step_input = ids, ids
        for _ in range(steps):
            logits = model.logits(model(step_input, attention_mask=mask, cache=cache)[:, -1])
            chosen = next_token(logits, tokens, sampling, generator)
            values = chosen.tolist()
            for r, token in enumerate(values):
                if done[r]:
                    continue
                if eos_id is not None and token == eos_id:
                    done[r] = True
                    continue
                new[r].append(token)
                done[r] = stopped(new[r])
            if all(done):
                break
            step_input = chosen[:, None]
            tokens = torch.cat([tokens, step_input], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
    return new


def generate_until(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, until: Sequence[str],
                   eos_id: int | None, sampling=None, seed: int | None = None, batch_size: int = 8) -> list[str]:
    """The text generated for each prompt (ids), through the inference engine: up to `batch_size` rows at
    once, a row ending at eos (left out), after `max_new_tokens`, or at the first of the stop strings
    `until`, where its text is cut (lm-eval's `postprocess_generated_text` cuts the same way). Greedy
    unless `sampling` (SamplingParams) has a temperature; a sampled row draws from its own generator
    seeded with `seed`, so rows with equal prompts get equal samples."""
    from slmforge.inference import Engine, SamplingParams

    if not prompts:
        return []
    sampling = sampling or SamplingParams()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, seed=seed, stop=[s for s in until if s],
                            stop_token_ids=[] if eos_id is None else [eos_id], stop_at_eos=False)
    engine = Engine(model, tokenizer=tokenizer, max_batch=max(1, min(batch_size, len(prompts))))
    return [completion.text for completion in engine.generate([list(p) for p in prompts], params)]


# ---------------------------------------------------------------- tasks for a language

# Languages `--list-tasks` knows: a name and the codes lm-eval's task names use for it (ISO 639-1,
# 639-3, the English name), matched as whole parts of a task name (between _ or -).
LANGUAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hi": ("Hindi", ("hi", "hin", "hindi")),
    "as": ("Assamese", ("asm", "assamese")),  # not "as": an English word in task names
    "bn": ("Bengali", ("bn", "ben", "bengali")),
    "mr": ("Marathi", ("mr", "mar", "marathi")),
    "ta": ("Tamil", ("ta", "tam", "tamil")),
    "de": ("German", ("de", "deu", "german")),
    "en": ("English", ()),  # most English tasks carry no code: ENGLISH_TASKS
}
ALIASES = {name.lower(): code for code, (name, _) in LANGUAGES.items()}

# English: well-known benchmarks, kept when the installed lm-eval has them.
ENGLISH_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq",
                 "lambada_openai", "lambada_standard", "wikitext", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2",
                 "copa", "xnli_en", "xstorycloze_en", "xwinograd_en", "pawsx_en", "paws_en", "belebele_eng_Latn",
                 "global_mmlu_en", "global_mmlu_full_en", "mgsm_direct_en", "gsm8k", "triviaqa", "nq_open",
                 "blimp", "multiblimp_eng")

# Families whose names carry language codes of other things: translation grids and suites translated
# into another language (`flores_hin_Deva-eng_Latn`, `basque_bench_...`), sentence-level probes.
NOT_LISTED = ("flores", "ntrex", "afri", "bertaqa", "basque_bench", "catalan_bench", "galician_bench",
              "spanish_bench", "portuguese_bench", "toksuite", "crows_pairs", "bhs__")


def language_code(name: str) -> str:
    code = ALIASES.get(name.lower(), name.lower())
    if code not in LANGUAGES:
        known = ", ".join(f"{c} ({n})" for c, (n, _) in LANGUAGES.items())
        raise SlmforgeError(f"--list-tasks: unknown language {name!r}; known: {known}")
    return code


def tasks_for_language(index: dict[str, tuple[str, str | None]], code: str) -> list[str]:
    """Task, group and tag names of `index` (name -> (kind, output type)) for a language: names with one
    of its codes as a part (English: ENGLISH_TASKS that exist), without the translation grids of
    NOT_LISTED, and with a group's own subtasks folded into the group (`global_mmlu_full_hi`, not its
    57 subjects). mlqa's cross-lingual pairs are left out (mlqa_hi_hi stays)."""
    import re

    if code == "en":
        return [name for name in ENGLISH_TASKS if name in index]
    codes = LANGUAGES[code][1]
    part = re.compile(r"(?:^|[_\-])(?:" + "|".join(map(re.escape, codes)) + r")(?:$|[_\-])", re.IGNORECASE)
    found = [name for name in sorted(index) if part.search(name) and not name.startswith(NOT_LISTED)
             and not (name.startswith("mlqa_") and len(set(name.split("_")[1:])) > 1)]
    collections = {name for name in found if index[name][0] in ("group", "tag")}
    return [name for name in found
            if not any(name != group and name.startswith(group + "_") for group in collections)]


def task_index(include_path: Sequence[str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Every name the installed lm-eval's registry knows: name -> (task / group / tag, output type)."""
    manager = task_manager(include_path)
    kinds = {"TASK": "task", "PY_TASK": "task", "GROUP": "group", "TAG": "tag"}
    index = {}
    for name, entry in manager.task_index.items():
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        index[name] = (kinds.get(entry.kind.name, entry.kind.name.lower()), cfg.get("output_type"))
    return index


def list_tasks(languages: Sequence[str], include_path: Sequence[str] | None = None, out=None) -> dict[str, list[str]]:
    """Print, per language, the task names the installed lm-eval knows for it; returns them."""
    out = out or sys.stdout
    codes = [language_code(name) for name in languages] or list(LANGUAGES)
    index = task_index(include_path)
    listing = {}
    out.write(f"lm-eval {lm_eval_version()}: {len(index)} task, group and tag names\n")
    for code in codes:
        listing[code] = tasks_for_language(index, code)
    width = max((len(name) for names in listing.values() for name in names), default=0) + 2
    for code, names in listing.items():
        out.write(f"\n{LANGUAGES[code][0]} ({code}): {len(names)}\n")
        for name in names:
            kind, output_type = index[name]
            out.write(f"  {name:<{width}}{kind:<7}{output_type or ''}\n")
    return listing


# ---------------------------------------------------------------- running tasks


def task_manager(include_path: Sequence[str] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager: its own tasks (indexing them takes seconds) and those under include_path."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    for path in paths:
        if not Path(path).exists():
            raise SlmforgeError(f"--include-path {path}: no such file or folder")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def go_offline() -> None:
    """Never try the network for datasets (tasks whose data is not cached then fail at once, instead of
    after the hub client's retries)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported already: it read the environment then
            setattr(sys.modules[module], name, True)


def _is_connection_error(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__ or ""
        if isinstance(error, ConnectionError) or module.startswith(("huggingface_hub", "requests", "urllib3",
                                                                      "httpx", "httpcore", "aiohttp")):
            return True
        if "OfflineModeIsEnabled" in type(error).__name__:
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def load_tasks(manager, names: Sequence[str]) -> list:
    """Task / group objects for each name, loaded one at a time so that an error names its task: an
    unknown name, or data that cannot be reached (no network, not in the datasets cache)."""
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except KeyError:
            raise SlmforgeError(f"--tasks: lm-eval {lm_eval_version()} knows no task {name!r} "
                                f"(`slmforge eval --list-tasks` lists them by language)") from None
        except Exception as e:  # noqa: BLE001 - datasets and the hub raise many kinds
            entry = manager.task_index.get(name)
            where = ((entry.cfg or {}).get("dataset_path") if entry is not None and isinstance(entry.cfg, dict)
                     else None)
            source = f" ({where})" if where else ""
            if _is_connection_error(e):
                raise SlmforgeError(f"task {name}: its data{source} cannot be reached offline and is not in the "
                                    f"datasets cache; run once with network access (or copy the HF datasets "
                                    f"cache here) and try again") from None
            raise SlmforgeError(f"task {name}: cannot load its data{source} ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: the tasks it stands for
            built.extend(loaded["tasks"].values())
    return built


def run_tasks(lm, names: Sequence[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: Sequence[str] | None = None, log_samples: bool = False,
              bootstrap_iters: int = 1000, manager=None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on `lm` (our backend, or any lm-eval LM) for the named tasks."""
    lm_eval = require_lm_eval()
    from lm_eval.utils import setup_logging

    if not names:
        raise SlmforgeError("--tasks: name at least one task")
    manager = manager or task_manager(include_path)
    setup_logging("WARNING")
    tasks = load_tasks(manager, names)
    with quiet_environment_report():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=log_samples,
                                          bootstrap_iters=bootstrap_iters)
    if results is None:
        raise SlmforgeError("lm-eval returned no results")
    return results


@contextmanager
def quiet_environment_report():
    """While simple_evaluate runs: no `git describe` of the working directory (it prints "fatal: not a
    git repository" outside one, and the working directory's commit says nothing about the model) and
    a short environment record instead of torch's collect_env, which spends seconds in subprocesses."""
    import platform

    import lm_eval.evaluator as evaluator

    def environment(storage: dict[str, Any]) -> None:
        storage.update({"pretty_env_info": f"python {platform.python_version()}, torch {torch.__version__}, "
                                           f"{platform.platform()}", "lm_eval_version": lm_eval_version()})

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), environment
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a task's resolved config as lm-eval reports it (JSON, sorted keys; functions by name)."""
    import re

    text = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # an object's repr names its address: not the config
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def harness_rows(results: dict[str, Any], limit: float | None = None) -> dict[str, dict[str, Any]]:
    """eval.json entries, one per task and group: `lm-eval:TASK` -> metrics (lm-eval's names; a filter
    other than "none" kept as metric,filter), their standard errors, lm-eval's version, the task's
    version, few-shot count, samples, and the sha256 of its config."""
    version = lm_eval_version()
    configs = results.get("configs", {})
    rows = {}
    for name, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key:
                continue
            metric, _, filt = key.partition(",")
            label = metric if filt == "none" else f"{metric},{filt}"
            if metric.endswith("_stderr"):
                number = _number(value)
                if number is not None:
                    stderr[label.replace("_stderr", "", 1)] = number
            elif _number(value) is not None:
                metrics[label] = _number(value)
        row: dict[str, Any] = {"harness": "lm-eval", "lm_eval_version": version, "task": name,
                               "metrics": metrics}
        if stderr:
            row["stderr"] = stderr
        if name in configs:
            row["config_sha256"] = config_hash(configs[name])
            row["output_type"] = configs[name].get("output_type")
        else:  # a group: its subtasks' config hashes, in order
            subtasks = results.get("group_subtasks", {}).get(name, [])
            row["subtasks"] = subtasks
            row["config_sha256"] = config_hash({t: config_hash(configs[t]) for t in subtasks if t in configs})
        if name in results.get("versions", {}):
            row["task_version"] = results["versions"][name]
        if name in results.get("n-shot", {}):
            row["num_fewshot"] = results["n-shot"][name]
        samples = (results.get("n-samples") or {}).get(name)
        if isinstance(samples, dict):
            row["samples"] = samples.get("effective")
        if limit is not None:
            row["limit"] = limit
        # Names `slmforge report` shows beside its own figures.
        if "acc" in metrics:
            row["accuracy"] = metrics["acc"]
        if "bits_per_byte" in metrics:
            row["bpb"] = metrics["bits_per_byte"]
        rows[EVAL_PREFIX + name] = row
    return rows


def print_harness_table(rows: dict[str, dict[str, Any]], out=None) -> None:
    """One line per task and metric: value, standard error, samples, few-shot."""
    out = out or sys.stdout
    out.write(f"{'task':<36}{'metric':<20}{'value':>12}{'stderr':>10}{'n':>8}{'shots':>7}\n")
    for key, row in rows.items():
        name = row.get("task", key)
        for metric, value in row["metrics"].items():
            err = row.get("stderr", {}).get(metric)
            shown = f"{value:>12.4f}" if abs(value) < 1e6 else f"{value:>12.4g}"
            out.write(f"{name:<36}{metric:<20}{shown}{(f'{err:.4f}' if err is not None else '-'):>10}"
                      f"{row.get('samples') or '-'!s:>8}{row.get('num_fewshot', '-')!s:>7}\n")
            name = ""
    version = next((r["lm_eval_version"] for r in rows.values()), None)
    if version:
        out.write(f"(lm-eval {version})\n")


def backend_for(run, batch_size: int = 8):
    """The lm-eval LM that answers with `run`'s model (decoder, or encoder-decoder for log-likelihood
    tasks); an encoder is refused in one line."""
    require_lm_eval()
    from slmforge.eval.harness_lm import SlmforgeLM

    if run.kind == "encoder":
        raise SlmforgeError(f"{run.step_dir}: a {run.model.cfg.family} encoder has no next-token "
                            f"probabilities; lm-eval tasks need a decoder (or an encoder-decoder)")
    return SlmforgeLM(run, batch_size=batch_size)


def parse_limit(text: str) -> float | int:
    """--limit: a count of examples per task (N), or a fraction of each task (0 < x < 1)."""
    try:
        value = float(text)
    except ValueError:
        raise SlmforgeError(f"--limit: expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value) or (value >= 1 and not value.is_integer()):
        raise SlmforgeError(f"--limit: a count of examples (1, 2, ...) or a fraction below 1, got {text}")
    return int(value) if value >= 1 else value
