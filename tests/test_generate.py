"""Sampling respects its filters exactly; generation is seeded and cache-independent."""

from __future__ import annotations

import pytest
import torch

from slmforge.inference.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate_ids,
    next_token,
)
from slmforge.models import DecoderConfig, build_model


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = torch.isfinite(apply_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(apply_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_sampling_never_draws_outside_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    probs = torch.softmax(logits, -1)[0]
    order = torch.argsort(probs, descending=True)
    top_k_set = set(order[:10].tolist())
    cumulative = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((cumulative < 0.7).sum()) + 1].tolist())
    generator = torch.Generator().manual_seed(1)
    context = torch.zeros(1, 1, dtype=torch.long)
    k_draws = {int(next_token(logits, context, SamplingConfig(temperature=1.0, top_k=10), generator))
               for _ in range(2000)}
    p_draws = {int(next_token(logits, context, SamplingConfig(temperature=1.0, top_p=0.7), generator))
               for _ in range(2000)}
    assert k_draws <= top_k_set and len(k_draws) > 5
    assert p_draws <= nucleus and len(p_draws) == len(nucleus)


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.fixture(scope="module")
def model():
    cfg = DecoderConfig.from_name("gemma3-tiny", vocab_size=60, sliding_window=5, global_every=2, max_seq_len=64)
    return build_model(cfg, seed=0).eval()


def test_seeded_generation_is_deterministic(model):
    prompt = torch.tensor([[1, 2, 3, 4]])
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    a, b = generate_ids(model, prompt, cfg), generate_ids(model, prompt, cfg)
    assert torch.equal(a, b)
    c = generate_ids(model, prompt, SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, seed=8))
    assert not torch.equal(a, c)


def test_cached_and_uncached_generation_agree(model):
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.9, top_p=0.9, seed=3, stop_at_eos=False)
    assert torch.equal(generate_ids(model, prompt, cfg, use_cache=True),
                       generate_ids(model, prompt, cfg, use_cache=False))


def test_generation_stops_at_eos(model):
    greedy = generate_ids(model, torch.tensor([[1, 2]]), SamplingConfig(max_new_tokens=10, temperature=0))
    eos = int(greedy[0, 4])  # pretend the 3rd generated token is EOS
    out = generate_ids(model, torch.tensor([[1, 2]]), SamplingConfig(max_new_tokens=10, temperature=0), eos_id=eos)
    assert out.shape[1] <= 5 and int(out[0, -1]) == eos


def test_streaming_callback_sees_every_new_token(model):
    seen = []
    out = generate_ids(model, torch.tensor([[3, 4]]), SamplingConfig(max_new_tokens=8, temperature=0,
                                                                      stop_at_eos=False), on_token=seen.append)
    assert seen == out[0, 2:].tolist()


def test_prompt_longer_than_the_context_is_one_clear_error(model):
    from slmforge.errors import SlmforgeError

    with pytest.raises(SlmforgeError, match="leaves no room to generate"):
        generate_ids(model, torch.zeros(1, 64, dtype=torch.long), SamplingConfig(max_new_tokens=5))


def test_eval_layout_follows_training_bos_choice():
    """Text is laid out for scoring as `data prepare` wrote it: with bos only if training had it."""
    from types import SimpleNamespace

    from slmforge.eval.evaluate import document_stream

    backend = SimpleNamespace(encode_special_tokens=False)
    tok = SimpleNamespace(bos_id=1, eos_id=2, backend=backend,
                          treat_special_strings_as_text=lambda: setattr(backend, "encode_special_tokens", True),
                          encode_batch=lambda docs: [[10 + len(d)] for d in docs])
    assert document_stream(tok, ["ab", "c"], add_bos=True) == ([1, 12, 2, 1, 11, 2],
                                                              [False, True, True, False, True, True])
    assert document_stream(tok, ["ab", "c"], add_bos=False) == ([12, 2, 11, 2], [True] * 4)
    assert backend.encode_special_tokens is False  # the caller's tokenizer is left as it was


def test_decoding_threads_are_chosen_and_restored(model):
    """Issue 17 (b): a small model decodes on one CPU thread (unless `threads` says otherwise), and the
    process's setting is restored afterwards."""
    from slmforge.inference.generate import decode_threads

    assert decode_threads(model, 1, torch.device("cpu")) == 1
    before = torch.get_num_threads()
    seen = []
    for threads in (0, 2):
        cfg = SamplingConfig(max_new_tokens=3, temperature=0, stop_at_eos=False, threads=threads)
        generate_ids(model, torch.tensor([[1, 2]]), cfg, on_token=lambda _: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == before
    assert seen == [1, 1, 1, 2, 2, 2]


# ---------------------------------------------------------------- one set of defaults; the verb over the engine


def test_one_set_of_sampling_defaults():
    """SamplingConfig (the verb's), SamplingParams (the engine's) and Seq2SeqConfig (encoder-decoders) are
    one type with one set of defaults: greedy unless asked. `max_tokens` is another name for max_new_tokens."""
    import dataclasses

    from slmforge import config
    from slmforge.inference import SamplingParams
    from slmforge.inference.seq2seq import Seq2SeqConfig

    assert SamplingConfig is SamplingParams and issubclass(Seq2SeqConfig, SamplingParams)
    shared = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    assert {f.name: f.default for f in dataclasses.fields(Seq2SeqConfig) if f.name in shared} == shared
    assert SamplingParams().temperature == 0.0
    assert SamplingParams(max_tokens=7).max_new_tokens == 7
    assert config.load(SamplingConfig, overrides=["max_tokens=5", 'stop=["\\n"]']) == SamplingParams(
        max_new_tokens=5, stop=["\n"])


WORDS = [f"s{i}" for i in range(16)]


def run_folder(tmp_path, meta: dict):
    from conftest import word_level_tokenizer

    from slmforge.checkpoint.writing import write_model_folder
    from slmforge.models import config_from_dict

    run = tmp_path / "run"
    tokenizer = word_level_tokenizer(run / "tokenizer", WORDS)
    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": tokenizer.vocab_size}), seed=0)
    (run / "checkpoints").mkdir()
    write_model_folder(run / "checkpoints" / "step-000000", model, {"tokenizer_sha256": tokenizer.sha256, **meta})
    (run / "checkpoints" / "latest").write_text("step-000000\n")
    return run, tokenizer


def test_several_prompts_are_batched_with_the_output_of_one_at_a_time(tmp_path, capsys):
    """`generate -p a -p b -p c -n 2` runs every (prompt, sample) through one engine batch; what it prints
    (streamed or --json) is what the prompts give one at a time."""
    import json

    from slmforge.cli import main

    run, _ = run_folder(tmp_path, {"objective": {"kind": "clm"}, "add_bos": True})
    prompts = ["s1 s2", "s3", "s4 s5 s6 s7 s8"]
    fields = ["temperature=0.9", "seed=3", "max_new_tokens=12", "stop_at_eos=false"]
    for json_flag in ([], ["--json"]):
        singles = []
        for prompt in prompts:
            assert main(["generate", str(run), "-p", prompt, "-n", "2", *fields, *json_flag]) == 0
            singles.append(capsys.readouterr().out)
        argv = ["generate", str(run), *(w for p in prompts for w in ("-p", p)), "-n", "2", *fields, *json_flag]
        assert main(argv) == 0
        batched = capsys.readouterr().out
        if json_flag:
            rows = json.loads(batched)
            assert rows == [row for out in singles for row in json.loads(out)]
            # stop_at_eos=false: every sample runs to its budget; the prompt counts its own tokens
            assert {(r["finish_reason"], r["completion_tokens"]) for r in rows} == {("length", 12)}
            assert [r["prompt_tokens"] for r in rows[::2]] == [3, 2, 6]  # bos + the prompt's words
        else:
            assert batched == "".join(singles) and batched.count("\n\n") == 6


def test_prompt_format_reads_the_run(tmp_path):
    """add_bos and a chat run's end-of-turn token come from meta.json through prompt_format alone."""
    from slmforge.checkpoint.reading import open_run
    from slmforge.inference import prompt_format

    run, tokenizer = run_folder(tmp_path, {"objective": {"kind": "clm"}, "add_bos": False,
                                           "finetune": {"stop_token": "[PAD]"}})
    layout = prompt_format(open_run(run))
    assert layout.encode("s1 s2") == tokenizer.encode("s1 s2")  # no bos: training had none
    assert layout.stop_ids == [tokenizer.token_to_id("[PAD]"), tokenizer.eos_id]
    with pytest.raises(Exception, match="no chat template"):
        layout.chat([{"role": "user", "content": "s1"}])


def test_held_out_answers_are_batched_with_the_answers_one_at_a_time(tmp_path):
    """Fine-tuning's held-out generation answers its examples in engine batches (prompts of different
    lengths together): the same answers as one example at a time."""
    from types import SimpleNamespace

    from conftest import word_level_tokenizer

    from slmforge.finetune.evaluate import answer, answers

    tokenizer = word_level_tokenizer(tmp_path / "tok", WORDS)
    model = build_model(DecoderConfig.from_name("test-tiny", vocab_size=tokenizer.vocab_size), seed=1).eval()
    generator = torch.Generator().manual_seed(2)
    examples = [SimpleNamespace(ids=torch.randint(5, tokenizer.vocab_size, (n + 3,), generator=generator),
                                prompt_len=n) for n in (2, 7, 1, 12, 4)]
    stop = tokenizer.token_to_id("s3")
    one_at_a_time = [answer(model, e, stop, 10, tokenizer) for e in examples]
    assert answers(model, examples, stop, 10, tokenizer, batch_size=3) == one_at_a_time
    assert len(set(one_at_a_time)) > 1
