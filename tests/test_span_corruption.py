"""Span corruption: T5's lengths, exact reassembly, span statistics, per-sample seeding, both forms."""

from __future__ import annotations

from math import comb

import pytest
import torch

from slmforge.errors import SlmforgeError
from slmforge.objectives import SpanConfig, SpanCorruption, build_objective
from slmforge.objectives.span import (
    corrupted_lengths,
    noise_counts,
    window_for_inputs,
    window_for_prefix,
)

EOS, SEPARATOR = 1, 2
SENTINELS = list(range(1000, 1100))  # 100, as T5


def objective(kind: str = "encoder-decoder", **fields) -> SpanCorruption:
    return SpanCorruption(SpanConfig(**fields), sentinel_ids=SENTINELS, eos_id=EOS, model_kind=kind,
                          separator_id=SEPARATOR if kind == "decoder" else None)


def windows(count: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 1000, (count, length), generator=torch.Generator().manual_seed(seed))


def reassemble(inputs: list[int], targets: list[int]) -> list[int]:
    """The original window from a corrupted input and its targets: each sentinel in the input becomes the
    tokens that follow the same sentinel in the targets."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(token) if token in SENTINELS else [token])
    assert not spans  # every span was used once
    return out


def test_lengths_are_t5s_and_fill_the_inputs_exactly():
    # T5's random_spans_helper: 512 encoder tokens at 0.15 / 3 come from 568-token windows, 114 targets.
    assert window_for_inputs(512, 0.15, 3.0) == 568
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)
    for inputs in (16, 32, 64, 100, 128, 255, 256, 512, 1024):
        for density, mean in ((0.15, 3.0), (0.3, 8.0), (0.1, 1.0)):
            window = window_for_inputs(inputs, density, mean)
            assert corrupted_lengths(window, density, mean)[0] == inputs, (inputs, density, mean)
            assert corrupted_lengths(window + 1, density, mean)[0] > inputs  # the longest that fits
    for seq_len in (32, 64, 127, 512):  # prefix form: within two tokens of seq_len + 1, never over
        window = window_for_prefix(seq_len, 0.15, 3.0)
        _, spans = noise_counts(window, 0.15, 3.0)
        assert seq_len - 1 <= window + 2 * spans + 2 <= seq_len + 1


@pytest.mark.parametrize("inputs_length", [64, 512])
def test_inputs_and_targets_reassemble_into_the_original_window(inputs_length):
    span = objective()
    window = span.window_tokens(inputs_length)
    tokens = windows(32, window)
    batch = span.collate({"tokens": tokens, "sample_ids": torch.arange(32)}, 3)
    assert batch["input_ids"].shape == (32, inputs_length)
    assert batch["targets"].shape == (32, span.lengths(window)[1])
    for row in range(32):
        assert reassemble(batch["input_ids"][row].tolist(), batch["targets"][row].tolist()) == tokens[row].tolist()
        # sentinels are numbered in order in both
        used = [t for t in batch["input_ids"][row].tolist() if t in SENTINELS]
        assert used == SENTINELS[:len(used)]
        assert [t for t in batch["targets"][row].tolist() if t in SENTINELS] == used


def test_measured_noise_density_and_span_lengths_match_the_config():
    """Per window the counts are T5's rounding of the config; the span lengths are a uniformly random
    split of the noise into that many spans, checked against the exact distribution of one span's length."""
    density, mean = 0.15, 3.0
    span = objective(noise_density=density, mean_span_length=mean)
    window = span.window_tokens(128)
    noise, spans = noise_counts(window, density, mean)
    lengths, noise_total, token_total = [], 0, 0
    for step in range(50):
        batch = span.collate({"tokens": windows(16, window, seed=step), "sample_ids": torch.arange(16) + 16 * step}, 0)
        for targets in batch["targets"].tolist():
            body = targets[:-1]
            starts = [i for i, t in enumerate(body) if t in SENTINELS] + [len(body)]
            row_lengths = [b - a - 1 for a, b in zip(starts, starts[1:])]
            assert len(row_lengths) == spans and min(row_lengths) >= 1
            lengths.extend(row_lengths)
            noise_total += sum(row_lengths)
            token_total += window
    assert abs(noise_total / token_total - density) <= 0.5 / window  # round(length x density)
    assert abs(noise_total / len(lengths) - mean) <= mean / (2 * spans)  # round(noise / mean) spans
    # P(a span has length l) for a uniform composition of `noise` into `spans` positive parts
    n = len(lengths)
    for length in (1, 2, 3, 5):
        p = comb(noise - length - 1, spans - 2) / comb(noise - 1, spans - 1)
        seen = sum(1 for x in lengths if x == length)
        assert abs(seen - n * p) < 5 * (n * p * (1 - p)) ** 0.5 + 1, (length, seen / n, p)


def test_corruption_depends_on_the_seed_and_the_sample_only():
    span = objective()
    window = span.window_tokens(48)
    tokens, ids = windows(4, window), torch.tensor([10, 11, 12, 13])
    first = span.collate({"tokens": tokens, "sample_ids": ids}, 7)
    again = span.collate({"tokens": tokens[[2, 0]], "sample_ids": ids[[2, 0]]}, 7)
    assert torch.equal(again["input_ids"], first["input_ids"][[2, 0]])
    assert torch.equal(again["targets"], first["targets"][[2, 0]])
    assert not torch.equal(span.collate({"tokens": tokens, "sample_ids": ids}, 8)["input_ids"], first["input_ids"])
    assert not torch.equal(span.collate({"tokens": tokens, "sample_ids": ids + 4}, 7)["input_ids"], first["input_ids"])


def test_a_window_that_scores_nothing_has_no_targets():
    span = objective()
    window = span.window_tokens(32)
    scored = torch.ones(2, window, dtype=torch.bool)
    scored[1] = False  # the loader's filler past the end of a split
    batch = span.collate({"tokens": windows(2, window), "scored": scored}, 0)
    assert (batch["targets"][1] == -100).all() and (batch["targets"][0] != -100).all()


def test_prefix_form_for_decoders_predicts_the_targets_only():
    span = objective("decoder")
    seq_len = 96
    window = span.window_tokens(seq_len)
    tokens = windows(8, window)
    batch = span.collate({"tokens": tokens, "sample_ids": torch.arange(8)}, 0)
    encdec = objective().collate({"tokens": tokens, "sample_ids": torch.arange(8)}, 0)  # same draws
    length = batch["input_ids"].shape[1]
    assert seq_len - 2 <= length <= seq_len
    for row in range(8):
        sequence = batch["input_ids"][row].tolist() + [batch["targets"][row, -1].item()]
        cut = sequence.index(SEPARATOR)
        inputs, targets = sequence[:cut] + [EOS], sequence[cut + 1:]
        assert reassemble(inputs, targets) == tokens[row].tolist()
        assert inputs == encdec["input_ids"][row].tolist() and targets == encdec["targets"][row].tolist()
        labels = batch["targets"][row]
        assert (labels[:cut] == -100).all()  # nothing before the separator is predicted
        assert labels[cut:].tolist() == targets  # the separator predicts the first sentinel, ... the last eos


def test_tokenizers_without_sentinels_or_too_few_are_one_line_naming_the_fix(tmp_path):
    from conftest import word_level_tokenizer

    tokenizer = word_level_tokenizer(tmp_path / "tok", ["a", "b"])
    with pytest.raises(SlmforgeError, match=r"no sentinel tokens .*tokenizer.num_sentinels = 100"):
        build_objective(SpanConfig(), "encoder-decoder", "t5", tokenizer, where="data/manifest.json")
    with pytest.raises(SlmforgeError, match=r"'span' cannot train model family 'bert' \(an encoder\)"):
        build_objective(SpanConfig(), "encoder", "bert", tokenizer)
    few = SpanCorruption(SpanConfig(), sentinel_ids=SENTINELS[:3], eos_id=EOS)
    with pytest.raises(SlmforgeError, match=r"makes 5 spans but the tokenizer has 3 sentinel tokens.*num_sentinels >= 5"):
        few.window_tokens(100)
