"""`slmforge translate`: translate a file line by line with a fine-tuned run.

An encoder-decoder reads each line as a source laid out as it trained (`text eos`, see
`finetune.templates.PairEncoder`) in padded batches through the inference engine's Seq2SeqEngine
(greedy or beam search, length penalty); a decoder fine-tuned with finetune.task = "translate" gets
each line in the run's prompt (finetune.translate_prompt in its chat template) and answers greedily,
the lines of a batch together through the inference engine. Empty lines stay empty, so the output lines up with the input line for line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from slmforge.errors import SlmforgeError
from slmforge.seq2seq_generate import Seq2SeqConfig


@torch.no_grad()
def translate_ids(model, sources: list[list[int]], cfg: Seq2SeqConfig, eos_id: int, pad_id: int) -> list[list[int]]:
    """Target ids (without eos) for source ids (each ending in eos) of an encoder-decoder, as one
    padded batch."""
    from slmforge.inference import Seq2SeqEngine

    done = Seq2SeqEngine(model, max_batch=len(sources), pad_id=pad_id).generate(sources, cfg, eos_id=eos_id)
    return [c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids for c in done]


class Translator:
    """A run's model and tokenizer, ready to translate lists of lines."""

    def __init__(self, run, cfg: Seq2SeqConfig):
        self.run, self.cfg = run, cfg
        self.model, self.tokenizer = run.model, run.tokenizer()
        finetuned = run.meta.get("finetune") or {}
        if run.kind == "encoder-decoder":
            if self.tokenizer.eos_id is None:
                raise SlmforgeError(f"{run.step_dir}: the tokenizer has no eos token, which ends every source")
            self.prompt = None
        elif run.kind == "decoder" and finetuned.get("task") == "translate":
            if cfg.num_beams > 1:
                raise SlmforgeError("--beams: beam search is for encoder-decoders; a decoder translates greedily")
            settings = (run.meta.get("config") or {}).get("finetune") or {}
            self.prompt = settings.get("translate_prompt", "{src}")
            stop = finetuned.get("stop_token")
            self.stop_id = self.tokenizer.token_to_id(stop) if stop else self.tokenizer.eos_id
        else:
            tuned = f", fine-tuned for {finetuned['task']}" if finetuned.get("task") else ""
            raise SlmforgeError(f"{run.step_dir}: translate needs an encoder-decoder, or a decoder fine-tuned with "
                                f"finetune.task = \"translate\" (this is a {run.model.cfg.family} {run.kind}{tuned})")
        self.limit = run.model.cfg.max_seq_len
        self.warned = False

    def translate(self, lines: list[str]) -> list[str]:
        """One translation per line; an empty line gives an empty translation."""
        out = [""] * len(lines)
        todo = [i for i, line in enumerate(lines) if line.strip()]
        if not todo:
            return out
        if self.prompt is None:
            tok = self.tokenizer
            sources = [tok.encode(lines[i].strip()) for i in todo]
            cut = [len(ids) for ids in sources if len(ids) > self.limit - 1]
            if cut and not self.warned:  # said once, not per batch
                from slmforge.formatting import say

                say(f"warning: a line of {cut[0]} tokens is longer than the model's {self.limit - 1} source tokens "
                    f"(max_seq_len with eos); such lines are cut to fit")
                self.warned = True
            sources = [ids[:self.limit - 1] + [tok.eos_id] for ids in sources]
            pad = tok.pad_id if tok.pad_id is not None else 0
            for i, ids in zip(todo, translate_ids(self.model, sources, self.cfg, tok.eos_id, pad)):
                out[i] = tok.decode(ids)
            return out
        from slmforge.inference import Engine, SamplingParams
        from slmforge.tokenizer.chat import chat_prompt

        # the lines of a batch decode together through the engine (prompts of different lengths share it)
        prompts = [self.tokenizer.encode(chat_prompt(self.tokenizer, self.prompt.replace("{src}", lines[i].strip())))
                   for i in todo]
        sampling = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=0.0,
                                  stop_token_ids=[self.stop_id] if self.stop_id is not None else [])
        for i, done in zip(todo, Engine(self.model, max_batch=len(todo)).generate(prompts, sampling)):
            out[i] = self.tokenizer.decode(done.token_ids[:-1] if done.finish_reason == "stop" else done.token_ids)
        return out

    def stream(self, lines: list[str], batch_size: int, on_batch: Callable[[int], None] | None = None
               ) -> Iterator[str]:
        """Translations of `lines` in order, a batch at a time (`on_batch(lines done)` after each)."""
        for start in range(0, len(lines), batch_size):
            yield from self.translate(lines[start:start + batch_size])
            if on_batch is not None:
                on_batch(min(start + batch_size, len(lines)))


# ---------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_run)


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


def _run(args: argparse.Namespace) -> int:
    from slmforge.formatting import duration, live_terminal, quiet
    from slmforge.runs import open_run
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
