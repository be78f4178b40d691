"""One inference engine: SamplingParams (one set of defaults), PromptFormat (a run's prompt layout),
Engine (decoders: batched prompts of different lengths, streaming, continuous batching, caches it
owns), Seq2SeqEngine (encoder-decoders: padded batches, greedy, sampling, beam search).
See docs/inference.md."""

from slmforge.inference.engine import Completion, Engine, Request, StreamEvent
from slmforge.inference.prompt import PromptFormat, prompt_format
from slmforge.inference.sampling import SamplingParams, next_token
from slmforge.inference.seq2seq import Seq2SeqConfig, Seq2SeqEngine
from slmforge.inference.text import TextStream

__all__ = ["Completion", "Engine", "PromptFormat", "Request", "SamplingParams", "Seq2SeqConfig", "Seq2SeqEngine",
           "StreamEvent", "TextStream", "next_token", "prompt_format"]
