"""Streaming text: the pieces a generation yields join to its text, and none ends inside a character or a
grapheme cluster (Hindi and Bengali/Assamese conjuncts, vowel signs, emoji ZWJ sequences spelled in
byte-fallback tokens), nor shows the start of a stop string; stop strings cut the text through the engine."""

from __future__ import annotations

import pytest
import regex
import torch

from slmforge.inference import Engine, SamplingParams, TextStream
from slmforge.models import DecoderConfig, build_model
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

CORPUS = ["क्षत्रिय क्षमा शिक्षा विद्यालय में पढ़ता है।", "অসমীয়া ভাষা ক্ষমা কৰক।", "বাংলা ভাষায় কথা বলি।",
          "Die Straße ist schön.", "hello world, hello there"] * 20
TEXTS = ["क्षि क्षत्रिय शिक्षा", "অসমীয়া ক্ষমা স্ত্ৰী", "👨‍👩‍👧 family 👍🏽 ok", "নমস্কাৰ 🇮🇳 জয় হিন্দ", "தமிழ் நீ"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), tmp_path_factory.mktemp("tok"), CORPUS)
    return load_tokenizer(folder)


def boundaries(text: str) -> set[int]:
    return {m.end() for m in regex.finditer(r"\X", text)} | {0}


def test_pieces_end_at_grapheme_cluster_boundaries(tokenizer):
    spelled_in_bytes = 0
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        spelled_in_bytes += len(set(ids) & set(tokenizer.byte_ids))
        stream = TextStream(tokenizer)
        pieces = [stream.add(i) for i in ids]
        shown = ""
        for piece in pieces:
            shown += piece
            assert "\ufffd" not in shown and len(shown) in boundaries(text), (text, shown)
        assert shown + stream.finish() == text
        assert sum(1 for p in pieces if p) < len(ids)  # something was held back
    assert spelled_in_bytes > 0  # some characters (emoji, Tamil) arrived as single bytes


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i] (decode joins them)."""
    PIECES = ["Hello", " wor", "ld", "<", "/s", ">", "more", "<", "x"]

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def test_a_stop_string_is_held_back_while_it_may_complete_and_cuts_the_text():
    stream = TextStream(Pieces(), stop=["</s>"])
    shown = [stream.add(i) for i in range(6)]
    assert shown == ["Hell", "o wo", "rl", "d", "", ""] and stream.stopped  # the last character waits
    assert "".join(shown) == stream.text == "Hello world"
    assert stream.add(6) == "" and stream.finish() == ""  # nothing after the stop string
    loose = TextStream(Pieces(), stop=["</s>"])  # "<" then "x": not the stop string after all
    assert [loose.add(i) for i in (0, 7, 8)] == ["Hell", "o", "<"] and loose.finish() == "x"


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = DecoderConfig.from_name("llama-tiny", vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=96)
    return build_model(cfg, seed=0).eval()


@torch.no_grad()
def test_engine_stream_joins_to_the_completion_and_stop_strings_cut_it(model, tokenizer):
    engine = Engine(model, tokenizer=tokenizer, max_batch=4)
    batch = [tokenizer.encode(t) for t in TEXTS[:4]]
    params = SamplingParams(max_new_tokens=40, stop_at_eos=False, temperature=1.0, seed=1)
    full = engine.generate(batch, params)
    texts = [""] * len(batch)
    for event in engine.stream(batch, params):
        texts[event.request_id] += event.text
        assert len(texts[event.request_id]) in boundaries(full[event.request_id].text)
    assert texts == [c.text for c in full]
    row = next(i for i, c in enumerate(full) if len(c.text) > 12)
    stop = full[row].text[8:11]
    cut = engine.generate([batch[row]], SamplingParams(**{**params.__dict__, "stop": ["\x00never", stop]}))[0]
    assert cut.text == full[row].text[:full[row].text.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full[row].token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 40


@pytest.mark.parametrize("kind", ["bpe", "bytelevel", "unigram"])
def test_long_generations_decode_as_a_whole_and_per_token_cost_stays_flat(kind, tmp_path):
    """The stream decodes only the last few ids again each step; its text must still be exactly
    decode(all ids), for random id sequences (bytes split anywhere, spaces, every script) of each kind."""
    folder = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=300 if kind != "unigram" else 400), tmp_path / kind, CORPUS)
    tok = load_tokenizer(folder)
    rng = torch.Generator().manual_seed(0)
    calls = []
    decode = tok.decode

    class Counting:
        byte_ids = tok.byte_ids

        def decode(self, ids):
            calls.append(len(ids))
            return decode(ids)

    for trial in range(5):
        ids = torch.randint(0, tok.vocab_size, (300,), generator=rng).tolist()
        stream = TextStream(Counting())
        for i in ids:
            stream.add(i)
        assert stream.text == decode(ids), (kind, trial)  # (random bytes rewrite earlier text: nothing to stream)
    text_ids = [i for text in TEXTS for i in tok.encode(text + " ")] * 10
    calls.clear()
    stream = TextStream(Counting())
    pieces = "".join(stream.add(i) for i in text_ids)
    assert stream.text == decode(text_ids) == pieces + stream.finish()
    # no call decodes the whole generation: the context, plus the longest byte run (an emoji family)
    assert max(calls) <= 40 < len(text_ids), (max(calls), len(text_ids))
