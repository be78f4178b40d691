"""The inference verbs: `slmforge generate`, `slmforge translate` and `slmforge fill-mask` (their
library: inference/generate.py, translate.py, fill_mask.py and the engine)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from slmforge.arguments import HelpFormatter
from slmforge.errors import SlmforgeError
from slmforge.formatting import say
from slmforge.inference import Engine
from slmforge.inference.fill_mask import fill_masks
from slmforge.inference.generate import (
    SHORT_ANSWER,
    SamplingConfig,
    applicable_switches,
    generate_text,
    read_prompt,
    why_no_text,
)
from slmforge.inference.seq2seq import Seq2SeqConfig
from slmforge.inference.translate import Translator


def register(sub: argparse._SubParsersAction) -> None:
    _register_generate(sub)
    _register_translate(sub)
    _register_fill_mask(sub)


# ---------------------------------------------------------------- generate


def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model (KV cache, streaming)",
                       description="Generate text from a run or checkpoint folder; several prompts (-p a -p b, "
                                   "-n samples) decode together in one batch. Sampling fields (greedy unless "
                                   "temperature > 0): max_new_tokens (or max_tokens), temperature, top_k, top_p, "
                                   "repetition_penalty, seed, stop (strings), stop_token_ids, stop_at_eos; "
                                   "threads, window_cache, static_cache, compile (compile=true: a compiled "
                                   "decoding step, CUDA graphs on GPUs; the first generation pays the compile). "
                                   "See docs/inference.md.")
    p.add_argument("model", help="run folder or checkpoint folder")
    p.add_argument("--prompt", "-p", action="append", help="prompt text (repeatable); default: read stdin")
    p.add_argument("--num-samples", "-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the run's chat template (fine-tuned runs) and stop "
                        "at the end of the answer")
    p.add_argument("--system", default="", help="with --chat: a system message before the prompt")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list of {prompt, sample, seed, completion, finish_reason, prompt_tokens, "
                        "completion_tokens} instead of streaming text")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="sampling fields, e.g. temperature=0.7 top_k=50 top_p=0.9 seed=1")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.checkpoint.reading import open_run
    from slmforge.inference import prompt_format
    from slmforge.runtime import resolve_device

    sampling = config.load(SamplingConfig, overrides=args.overrides)
    if args.num_samples < 1:
        raise SlmforgeError(f"--num-samples: must be at least 1, got {args.num_samples}")
    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    if run.kind == "encoder" and getattr(run.model.cfg, "has_classifier", False):
        raise SlmforgeError(f"{args.model}: a {run.model.cfg.family} encoder fine-tuned to {run.model.cfg.head} labels "
                            f"rather than continuing text; use `slmforge classify {args.model} --input FILE`")
    if run.kind == "encoder":
        raise SlmforgeError(f"{args.model}: a {run.model.cfg.family} encoder fills masks rather than continuing "
                            f"text; use `slmforge fill-mask {args.model} \"text with [MASK]\"`")
    tokenizer = run.tokenizer()
    layout = prompt_format(run, tokenizer)
    sampling = applicable_switches(run.model, sampling)  # said before any text is written
    prompts = args.prompt or [read_prompt(sys.stdin)]
    if args.num_samples > 1 and sampling.temperature == 0:
        say(f"note: temperature=0 decodes greedily, so the {args.num_samples} samples of a prompt are the same; "
            f"set temperature (e.g. temperature=0.8) to sample")
    # sample i of every prompt uses seed + i: the same prompt and seed give the same text
    jobs = [(prompt, i, replace(sampling, seed=None if sampling.seed is None else sampling.seed + i))
            for prompt in prompts for i in range(args.num_samples)]
    # one {finish_reason, prompt_tokens, completion_tokens} per job, filled as each one ends (for --json)
    details: list[dict] = [{} for _ in jobs]
    if run.kind == "encoder-decoder":
        texts = _encdec_texts(run, tokenizer, layout, jobs, args, details)
    else:
        texts = _decoder_texts(run, layout, jobs, args, details)
    if args.json:
        print(json.dumps([{"prompt": prompt, "sample": i, "seed": params.seed, "completion": text, **detail}
                          for (prompt, i, params), text, detail in zip(jobs, texts, details)],
                         indent=2, ensure_ascii=False))
    return 0


def _explainer(run, layout) -> Callable[[list[int]], None]:
    def explain(generated: list[int]) -> None:  # one line on stderr, after the (empty) text and its line end
        sys.stdout.flush()
        stops = layout.stop_ids
        stop = next((t for t in generated if t in stops), stops[0] if stops else None)
        say(why_no_text(generated, layout.tokenizer, run.info, stop))
    return explain


def _decoder_texts(run, layout, jobs, args, details: list[dict]) -> list[str]:
    """Every (prompt, sample) through one engine, in batches; streamed to stdout in order (the first
    unfinished job streams live, later ones print when their turn comes), unless --json."""
    sampling = jobs[0][2]
    inputs = [layout.chat(layout.user_turn(p, args.system)) if args.chat else layout.encode(p) for p, _, _ in jobs]
    engine = Engine(run.model, prompt_format=layout, max_batch=min(len(jobs), 32), threads=sampling.threads,
                    window_cache=sampling.window_cache, static_cache=sampling.static_cache, compile=sampling.compile)
    explain = _explainer(run, layout)
    texts = [""] * len(jobs)
    tokens: list[list[int]] = [[] for _ in jobs]
    done = [False] * len(jobs)
    head = 0  # the job whose text goes to stdout now

    def close(k: int) -> None:
        generated = tokens[k]
        stopped = bool(generated) and generated[-1] in layout.stop_ids
        answer = len(generated) - stopped
        if not args.json:  # the text's line ends before a note goes to stderr, so the two never share a line
            sys.stdout.write("\n\n")
        if not texts[k].strip() or (stopped and answer < SHORT_ANSWER):
            explain(generated)

    def start(k: int) -> None:
        if not args.json and not args.chat:  # a continuation reads on from its prompt; a chat answer stands alone
            sys.stdout.write(jobs[k][0])
        if not args.json:
            sys.stdout.write(texts[k])
            sys.stdout.flush()

    if jobs:
        start(0)
    for event in engine.stream(inputs, [params for _, _, params in jobs]):
        k = event.request_id
        if event.token_id is not None:
            tokens[k].append(event.token_id)
        texts[k] += event.text
        if k == head and event.text and not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.finish_reason is None:
            continue
        details[k].update(finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                          completion_tokens=event.completion_tokens)
        done[k] = True
        while head < len(jobs) and done[head]:  # the head ended: print the finished ones after it, in order
            close(head)
            head += 1
            if head < len(jobs):
                start(head)
    return texts


def _encdec_texts(run, tokenizer, layout, jobs, args, details: list[dict]) -> list[str]:
    """An encoder-decoder (not the engine's yet): one job at a time through generate_text."""
    stop_id = layout.stop_ids[0] if layout.stop_ids else None
    explain = _explainer(run, layout)
    texts = []
    for (prompt, _, params), detail in zip(jobs, details):
        text_in = layout.chat_text(layout.user_turn(prompt, args.system)) if args.chat else prompt
        if not args.json and not args.chat:
            sys.stdout.write(prompt)
        texts.append(generate_text(run.model, tokenizer, text_in, params, stream=not args.json, add_bos=False,
                                   stop_id=stop_id, on_empty=explain, details=detail))
        if not args.json:
            sys.stdout.write("\n\n")
    return texts


# ---------------------------------------------------------------- translate


def _register_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate", help="translate a text file line by line (encoder-decoders; decoders fine-tuned to translate)",
        description="Translate every line of --input with a run or checkpoint folder: an encoder-decoder in padded "
                    "batches (greedy or beam search), a decoder fine-tuned with finetune.task = \"translate\" "
                    "through its prompt template. Empty lines stay empty; progress goes to stderr.\n\n"
                    "examples:\n"
                    "  slmforge translate runs/de-en-mt --input test.de --out test.en --beams 4\n"
                    "  echo 'Der Hund schläft.' | slmforge translate runs/de-en-mt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder or checkpoint folder")
    p.add_argument("--input", "-i", help="text file, one source sentence per line (default: standard input)")
    p.add_argument("--out", "-o", help="file to write (default: standard output); written whole at the end")
    p.add_argument("--beams", type=int, default=1, help="beam search with this many hypotheses (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: hypotheses ranked by log-probability / length ** this")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest translation in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="lines translated together")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_translate)


def _read_lines(path: str | None) -> list[str]:
    if path is None:
        if sys.stdin.isatty():
            print("reading lines to translate from standard input (Ctrl-D to end; or pass --input FILE)",
                  file=sys.stderr, flush=True)
        return sys.stdin.read().splitlines()
    file = Path(path)
    if not file.exists() or file.is_dir():  # a pipe (`<(...)`) is not a regular file, but reads as one
        raise SlmforgeError(f"--input: {file} not found (or a folder)")
    lines = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                raise SlmforgeError(f"{file}:{number}: not UTF-8 (byte {e.start}); re-encode the file as "
                                    f"UTF-8") from None
    return lines


def _translate(args: argparse.Namespace) -> int:
    from slmforge.checkpoint.reading import open_run
    from slmforge.formatting import duration, live_terminal, quiet
    from slmforge.runtime import resolve_device

    for flag, value in (("--batch-size", args.batch_size), ("--beams", args.beams),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise SlmforgeError(f"{flag}: must be at least 1, got {value}")
    cfg = Seq2SeqConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams, length_penalty=args.length_penalty)
    lines = _read_lines(args.input)
    translator = Translator(open_run(args.model, device=resolve_device(args.device, "--device")), cfg)
    started = time.monotonic()
    show = not quiet()
    tty = live_terminal(sys.stderr)

    def on_batch(done: int) -> None:  # streamed progress: one line per batch (redrawn on a terminal)
        if show:
            elapsed = max(time.monotonic() - started, 1e-9)
            line = f"translate: {done}/{len(lines)} lines, {done / elapsed:.1f} lines/s"
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            sys.stderr.flush()

    if args.out is None:
        for text in translator.stream(lines, args.batch_size, on_batch):
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    else:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for text in translator.stream(lines, args.batch_size, on_batch):
                f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)  # nothing half-written under the final name
    if show:
        sys.stderr.write(("\r\x1b[K" if tty else "") + f"translate: {len(lines)} lines in "
                         f"{duration(time.monotonic() - started)}\n")
    if args.out is not None:
        print(args.out)
    return 0


# ---------------------------------------------------------------- fill-mask


def _register_fill_mask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fill-mask", help="a masked LM's top-k tokens for each [MASK] in a text",
                       description="Print the most likely tokens and their probabilities for every mask in TEXT,\n"
                                   "written as [MASK] or <mask> (or the tokenizer's own mask token).\n\n"
                                   "example:\n  slmforge fill-mask runs/bert \"the capital of france is [MASK].\"",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="run folder or checkpoint folder of an encoder (masked LM)")
    p.add_argument("text", nargs="*", help="texts with one or more masks each (batched); or --input")
    p.add_argument("--input", metavar="FILE", help="a text file, one text with masks per line (blank lines skipped)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--top-k", type=int, default=5, help="guesses per mask (default 5)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: for one text a list of guesses per mask; for several, one such list per text")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_fill_mask)


def _fill_mask(args: argparse.Namespace) -> int:
    from slmforge.checkpoint.reading import open_run
    from slmforge.runtime import resolve_device

    run = open_run(args.model, device=resolve_device(args.device, "--device"))
    if run.kind != "encoder":
        raise SlmforgeError(f"{args.model}: a {run.model.cfg.family} decoder continues text rather than filling "
                            f"masks; use `slmforge generate {args.model} -p \"...\"`")
    texts = list(args.text)
    if args.input:
        texts += _text_lines(Path(args.input))
    if not texts:
        raise SlmforgeError("give a text with [MASK] (or several), or --input FILE")
    if args.batch_size < 1:
        raise SlmforgeError(f"--batch-size: must be at least 1, got {args.batch_size}")
    per_text = fill_masks(run.model, run.tokenizer(), texts, args.top_k, run.info.add_bos, args.batch_size)
    if args.json:
        shown = [[[vars(g) for g in per_mask] for per_mask in guesses] for guesses in per_text]
        print(json.dumps(shown[0] if len(texts) == 1 else shown, indent=2, ensure_ascii=False))
        return 0
    for text, guesses in zip(texts, per_text):
        if len(texts) > 1:
            sys.stdout.write(f"{text}\n")
        for n, per_mask in enumerate(guesses, 1):
            sys.stdout.write(f"mask {n}:\n")
            for g in per_mask:
                sys.stdout.write(f"  {g.probability:8.4f}  {g.token!r}\n")
    return 0


def _text_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file (plain, .gz or .zst), each one text; a non-UTF-8 line is one error."""
    from slmforge.text.sources import numbered_lines

    texts = []
    for number, line in numbered_lines(path, "input file"):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise SlmforgeError(f"{path}:{number}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
        if text.strip():
            texts.append(text)
    return texts
