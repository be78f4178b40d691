"""The encoder-decoder side of the engine: sources of different lengths in padded batches give what
each gives alone (greedy and beam search), with eos as the stop and the text decoded."""

from __future__ import annotations

import torch

from slmforge.inference import Seq2SeqConfig, Seq2SeqEngine
from slmforge.models import EncDecConfig, build_model

EOS = 1


def test_padded_batches_give_each_source_its_output_alone():
    model = build_model(EncDecConfig.from_name("t5-tiny", vocab_size=97), seed=0).eval()
    generator = torch.Generator().manual_seed(5)
    sources = [torch.randint(2, 97, (n,), generator=generator).tolist() + [EOS] for n in (3, 11, 6, 1, 8)]
    for params in (Seq2SeqConfig(max_new_tokens=12), Seq2SeqConfig(max_new_tokens=12, num_beams=3)):
        batched = Seq2SeqEngine(model, max_batch=3).generate(sources, params, eos_id=EOS)
        alone = [Seq2SeqEngine(model, max_batch=1).generate([s], params, eos_id=EOS)[0] for s in sources]
        assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
        assert [c.prompt_tokens for c in batched] == [len(s) for s in sources]
        for c in batched:
            assert (c.finish_reason == "stop") == (c.token_ids[-1:] == [EOS]) and EOS not in c.token_ids[:-1]
            assert c.finish_reason == "stop" or c.completion_tokens == 12
