"""Translating lines with a fine-tuned run (the `slmforge translate` verb is in inference/commands.py).

An encoder-decoder reads each line as a source laid out as it trained (`text eos`, see
`finetune.templates.PairEncoder`) in padded batches through the inference engine's Seq2SeqEngine
(greedy or beam search, length penalty); a decoder fine-tuned with finetune.task = "translate" gets
each line in the run's prompt (finetune.translate_prompt in its chat template) and answers greedily,
the lines of a batch together through the inference engine. Empty lines stay empty, so the output lines up with the input line for line.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from slmforge.errors import SlmforgeError
from slmforge.inference.seq2seq import Seq2SeqConfig


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
        finetuned = run.info.finetune
        task = finetuned.task if finetuned is not None else None
        if run.kind == "encoder-decoder":
            if self.tokenizer.eos_id is None:
                raise SlmforgeError(f"{run.step_dir}: the tokenizer has no eos token, which ends every source")
            self.prompt = None
        elif run.kind == "decoder" and task == "translate":
            if cfg.num_beams > 1:
                raise SlmforgeError("--beams: beam search is for encoder-decoders; a decoder translates greedily")
            settings = run.info.config_section("finetune") or {}
            self.prompt = settings.get("translate_prompt", "{src}")
            stop = run.info.stop_token
            self.stop_id = self.tokenizer.token_to_id(stop) if stop else self.tokenizer.eos_id
        else:
            tuned = f", fine-tuned for {task}" if task else ""
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
