"""Hardening of user inputs: chat templates that would exhaust memory or time, an empty chat turn,
damaged .gz example and pair files, byte order marks, and examples far too long to tokenize."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import word_level_tokenizer

from slmforge.data.pairs import PairSourceConfig, read_pairs
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import ExamplesConfig
from slmforge.finetune.examples import Example, Skipped, parse_example, read_examples
from slmforge.finetune.templates import (
    ExampleEncoder,
    PairEncoder,
    TemplateChoice,
    chars_per_token,
    choose_template,
    encode_examples,
)
from slmforge.finetune.vocab import add_special_tokens
from slmforge.tokenizer import chat
from slmforge.tokenizer.chat import ChatTemplate, ChatTemplateLimit

MESSAGES = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w2 w1"}]
WORDS = ["w1", "w2", "user", "assistant"]


def chatml_word_tokenizer(folder: Path):
    choice = choose_template("chat", "chatml", None)
    tokenizer, _ = add_special_tokens(word_level_tokenizer(folder, WORDS), choice.added_tokens, choice.source)
    return tokenizer


# ---------------------------------------------------------------- 5: chat templates


def test_huge_repetition_in_a_template_is_one_line_naming_template_and_example(tmp_path):
    tokenizer = chatml_word_tokenizer(tmp_path / "tok")
    encoder = ExampleEncoder(tokenizer, TemplateChoice("{{ 'a' * 10**11 }}<|im_end|>", (), "<|im_end|>"), "chat")
    example = parse_example({"prompt": "w1", "response": "w2"}, ExamplesConfig(train_files=["x"]), "ex.jsonl:3")
    # a template fault is never skipped as a bad example: it would fail (slowly) on every one
    with pytest.raises(SlmforgeError, match=r"^ex.jsonl:3: finetune.chat_template: rendering stopped: the \* "
                                            r"operator would build more than"):
        encode_examples([example], encoder, 41, "skip", Skipped())


def test_nested_loops_stop_at_the_time_budget(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    template = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", {})
    started = time.monotonic()
    with pytest.raises(ChatTemplateLimit, match="rendering stopped: the render ran longer than 0.3 s"):
        template.render(MESSAGES)
    assert time.monotonic() - started < 5


def test_rendered_output_is_capped(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_CHARS", 100_000)
    template = ChatTemplate("{% for i in range(100000) %}{{ messages[0]['content'] * 10 }}{% endfor %}", {})
    with pytest.raises(ChatTemplateLimit, match="used more than its 100,"):
        template.render(MESSAGES)
    # ordinary templates are unaffected by the budget
    assert ChatTemplate(choose_template("chat", "chatml", None).source, {}).render(MESSAGES).count("<|im_end|>") == 2


def test_generate_chat_with_a_template_that_renders_an_empty_turn(tmp_path):
    from slmforge.inference.generate import SamplingConfig, generate_text
    from slmforge.models import build_model, config_from_dict
    from slmforge.tokenizer.chat import chat_prompt

    tokenizer = word_level_tokenizer(tmp_path / "tok", WORDS)
    tokenizer.meta["hf_settings"] = {"chat_template": "{% for m in messages if m.role == 'assistant' %}"
                                                      "{{ m.content }}{% endfor %}"}
    with pytest.raises(SlmforgeError, match="--chat: the run's chat template renders this turn as empty text"):
        chat_prompt(tokenizer, "w1 w2")
    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": tokenizer.vocab_size}),
                        device="cpu", seed=0)
    with pytest.raises(SlmforgeError, match="encodes to no tokens"):  # was an IndexError in decoding
        generate_text(model, tokenizer, "  ", SamplingConfig(max_new_tokens=2), add_bos=False)


# ---------------------------------------------------------------- 6 and 13: damaged .gz, byte order marks


def test_damaged_gz_example_and_pair_files_are_one_line(tmp_path):
    rows = "".join(json.dumps({"prompt": f"w{i}", "response": "w2", "src": "a", "tgt": "b"}) + "\n"
                   for i in range(50)).encode()
    (tmp_path / "notgz.jsonl.gz").write_bytes(b"this is not gzip data\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(rows)[:-20])
    for name in ("notgz.jsonl.gz", "cut.jsonl.gz"):
        path = str(tmp_path / name)
        with pytest.raises(SlmforgeError, match=rf"{name}: cannot read past line \d+ \("):
            read_examples([path], ExamplesConfig(train_files=[path]), Skipped())
        with pytest.raises(SlmforgeError, match=rf"{name}: cannot read past line \d+ \("):
            list(read_pairs(PairSourceConfig(path=path), "error", Counter(), {}))


def test_a_byte_order_mark_on_the_first_line_is_not_text(tmp_path):
    bom = "\ufeff"
    examples = tmp_path / "bom.jsonl"
    examples.write_text(bom + '{"prompt": "w1", "response": "w2"}\n{"prompt": "w2", "response": "w1"}\n',
                        encoding="utf-8")
    read = read_examples([str(examples)], ExamplesConfig(train_files=[str(examples)]), Skipped())
    assert [e.messages[0]["content"] for e in read] == ["w1", "w2"]
    pairs = tmp_path / "bom.pairs.jsonl"
    pairs.write_text(bom + '{"src": "a", "tgt": "b"}\n', encoding="utf-8")
    assert [p[:2] for p in read_pairs(PairSourceConfig(path=str(pairs)), "error", Counter(), {})] == [("a", "b")]
    tsv = tmp_path / "bom.tsv"
    tsv.write_text(bom + "a\tb\n", encoding="utf-8")
    assert [p[:2] for p in read_pairs(PairSourceConfig(path=str(tsv)), "error", Counter(), {})] == [("a", "b")]


# ---------------------------------------------------------------- 14: a huge example


class EncodeSpy:
    """The backend, recording the length of every text it tokenizes."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def encode(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_huge_example_is_refused_before_it_is_tokenized(tmp_path):
    from slmforge.tokenizer.config import TokenizerConfig
    from slmforge.tokenizer.train import train_on_sentences

    sentences = [f"reverse the words w{i} w{i + 1} and w{i * 3} please" for i in range(200)]
    base = train_on_sentences(TokenizerConfig(kind="bpe", vocab_size=400), sentences)  # byte fallback
    choice = choose_template("chat", "chatml", None)
    tokenizer, _ = add_special_tokens(base, choice.added_tokens, choice.source)
    per_token = chars_per_token(tokenizer)
    assert per_token is not None and per_token < 100
    # a word-level unknown token can stand for a whole word of any length: no bound, tokenizing decides
    assert chars_per_token(word_level_tokenizer(tmp_path / "words", WORDS)) is None

    cfg = ExamplesConfig(train_files=["x"])
    huge = "w1 " * 100_000
    examples = [parse_example({"prompt": "w1 w2", "response": "w2 w1"}, cfg, "ex.jsonl:1"),
                parse_example({"prompt": "w1", "response": huge}, cfg, "ex.jsonl:2")]
    encoder = ExampleEncoder(tokenizer, choice, "chat")
    tokenizer.backend = spy = EncodeSpy(tokenizer.backend)
    skipped = Skipped()
    assert len(encode_examples(examples, encoder, 41, "skip", skipped)) == 1
    assert skipped.counts == {"too long": 1} and max(spy.lengths) < 1000
    with pytest.raises(SlmforgeError, match=r"ex.jsonl:2: [\d,]+ characters, more than train.seq_len \+ 1 = 41 "
                                            r"tokens can hold"):
        encode_examples(examples, encoder, 41, "error", Skipped())

    pairs = PairEncoder(tokenizer)
    skipped = Skipped()
    kept = encode_examples([Example("p.jsonl:1", pair=("w1 w2", "w2 w1")), Example("p.jsonl:2", pair=(huge, "w1"))],
                           pairs, 40, "skip", skipped, "train.seq_len")
    assert len(kept) == 1 and skipped.counts == {"too long": 1} and max(spy.lengths) < 1000
