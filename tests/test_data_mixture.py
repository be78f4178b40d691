"""Mixtures: probabilities follow their formulas, draws follow the probabilities within sampling
error, the interleaved order is seeded and resumable, and sentence samples keep exact quotas."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from slmforge import config
from slmforge.text.mixture import (
    Interleaver,
    MixtureConfig,
    mixture_probabilities,
    quotas,
    sample_sentences,
    source_sizes,
)
from slmforge.text.sources import SourceConfig, SourceReader
from slmforge.errors import ConfigError


def corpus(tmp_path: Path, sizes: dict[str, int]) -> list[SourceConfig]:
    """One text file per language, lines `lang-i`, so every document names its source and index."""
    sources = []
    for lang, n in sizes.items():
        path = tmp_path / f"{lang}.txt"
        path.write_text("".join(f"{lang}-{i}\n" for i in range(n)), encoding="utf-8")
        sources.append(SourceConfig(path=str(path), lang=lang))
    return sources


def with_weights(sources: list[SourceConfig], weights: list[float]) -> list[SourceConfig]:
    for s, w in zip(sources, weights):
        s.weight = w
    return sources


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_ratio_weights_are_normalized():
    m = MixtureConfig([SourceConfig("a", weight=5), SourceConfig("b", weight=3),
                       SourceConfig("c", weight=2)])
    assert mixture_probabilities(m) == pytest.approx([0.5, 0.3, 0.2], abs=1e-15)


def test_temperature_probabilities_match_the_formula_exactly():
    sizes = [1_000_000, 50_000, 1_234]
    for alpha in (0.0, 0.3, 0.5, 1.0):
        m = MixtureConfig([SourceConfig("a"), SourceConfig("b"), SourceConfig("c")],
                          sampling="temperature", alpha=alpha)
        expected = np.array(sizes, dtype=np.float64) ** alpha
        expected /= expected.sum()
        got = mixture_probabilities(m, sizes)
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
        assert math.isclose(sum(got), 1.0, rel_tol=1e-13)
    # Ratio sampling without weights keeps natural shares (= alpha 1); alpha 0.3 lifts the smallest.
    natural = MixtureConfig([SourceConfig("a"), SourceConfig("b"), SourceConfig("c")])
    assert mixture_probabilities(natural, sizes)[2] == pytest.approx(1234 / sum(sizes), rel=1e-13)
    m.alpha = 0.3
    assert mixture_probabilities(m, sizes)[2] > 20 * 1234 / sum(sizes)


def test_mixture_validation_messages():
    with pytest.raises(ConfigError, match="sources: set weight on every source or on none"):
        config.from_dict(MixtureConfig, {"sources": [{"path": "a", "weight": 1}, {"path": "b"}]})
    with pytest.raises(ConfigError, match="sampling: temperature sampling derives"):
        config.from_dict(MixtureConfig, {"sources": [{"path": "a", "weight": 1}], "sampling": "temperature"})
    with pytest.raises(ConfigError, match=r"sources\[1\]\.weight: must be > 0"):
        config.from_dict(MixtureConfig, {"sources": [{"path": "a", "weight": 1},
                                                     {"path": "b", "weight": -1}]})
    with pytest.raises(ConfigError, match="sources: give at least one source"):
        config.from_dict(MixtureConfig, {})


def test_quotas_sum_to_total_and_follow_largest_remainder():
    assert quotas([0.5, 0.3, 0.2], 100_000) == [50_000, 30_000, 20_000]
    assert quotas([1 / 3, 1 / 3, 1 / 3], 100) == [34, 33, 33]
    assert sum(quotas([0.123, 0.456, 0.421], 997)) == 997


def test_interleaved_draws_match_ratios_within_binomial_error(tmp_path):
    sources = with_weights(corpus(tmp_path, {"as": 30_000, "hi": 30_000, "en": 30_000}), [0.5, 0.3, 0.2])
    readers = [SourceReader(s) for s in sources]
    stream = Interleaver(readers, [0.5, 0.3, 0.2], seed=7)
    n = 20_000
    drawn = Counter(index for index, _ in itertools.islice(stream, n))
    for index, p in enumerate([0.5, 0.3, 0.2]):
        assert within_binomial(drawn[index], n, p), (index, drawn[index])
    # Each source is read in its own order: the documents drawn from it are its first ones.
    it = iter(Interleaver([SourceReader(s) for s in sources], [0.5, 0.3, 0.2], seed=7))
    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for _ in range(3000):
        index, text = next(it)
        seen[index].append(text)
    for index, lang in enumerate(["as", "hi", "en"]):
        assert seen[index] == [f"{lang}-{i}" for i in range(len(seen[index]))]


def test_interleaving_is_seeded_and_resumes_from_state(tmp_path):
    sources = corpus(tmp_path, {"as": 500, "hi": 300, "en": 200})
    p = [0.2, 0.3, 0.5]

    def run(seed, stop="all_exhausted"):
        return list(Interleaver([SourceReader(s) for s in sources], p, seed, stop))

    full = run(1)
    assert full == run(1) and full != run(2)
    assert sorted(t for _, t in full) == sorted(f"{k}-{i}" for k, n in [("as", 500), ("hi", 300), ("en", 200)]
                                               for i in range(n))  # every document exactly once
    for cut in (1, 250, 777, 999):
        readers = [SourceReader(s) for s in sources]
        stream = Interleaver(readers, p, 1)
        head = [x for _, x in zip(range(cut), stream)]
        state, cursors = stream.state(), [r.cursor() for r in readers]
        stats = [r.stats.copy() for r in readers]
        resumed = Interleaver([SourceReader(s, st, c) for s, st, c in zip(sources, stats, cursors)],
                              p, 1, state=state)
        assert head + list(resumed) == full, cut


def test_first_exhausted_stops_at_the_first_empty_source(tmp_path):
    sources = corpus(tmp_path, {"big": 5000, "small": 100})
    drawn = list(Interleaver([SourceReader(s) for s in sources], [0.5, 0.5], 3, "first_exhausted"))
    counts = Counter(i for i, _ in drawn)
    assert counts[1] == 100
    assert within_binomial(counts[0], counts[0] + counts[1], 0.5)


def test_sample_sentences_keeps_quotas_and_records_the_draw(tmp_path):
    sources = with_weights(corpus(tmp_path, {"as": 4000, "hi": 3000, "en": 9000}), [0.5, 0.3, 0.2])
    mixture = MixtureConfig(sources, seed=5)
    sample, record = sample_sentences(mixture, 1000, max_chars=100)
    by_lang = Counter(s.split("-")[0] for s in sample)
    assert by_lang == {"as": 500, "hi": 300, "en": 200}
    assert [r["requested"] for r in record["sources"]] == [500, 300, 200]
    assert [r["available"] for r in record["sources"]] == [4000, 3000, 9000]
    assert [r["split"] for r in record["sources"]] == [0, 0, 0]
    assert record["drawn"] == 1000
    again, _ = sample_sentences(mixture, 1000, max_chars=100)
    assert again == sample
    assert len(set(sample)) == 1000  # drawn without replacement
    assert sample[:50] != sorted(sample[:50])  # shuffled across sources
    # Lines longer than max_chars are split into pieces that each count as a sentence, never cut off:
    # `as-10` ... `as-3999` (3990 lines) are longer than 4 characters.
    short, short_record = sample_sentences(mixture, 1000, max_chars=4)
    assert len(short) == 1000 and all(len(s) <= 4 for s in short)
    assert [r["split"] for r in short_record["sources"]] == [3990, 2990, 8990]
    assert [r["drawn"] for r in short_record["sources"]] == [500, 300, 200]


def test_sample_sentences_is_uniform_within_a_source(tmp_path):
    sources = corpus(tmp_path, {"xx": 200})
    hits = Counter()
    runs = 300
    for seed in range(runs):
        sample, _ = sample_sentences(MixtureConfig(sources, seed=seed), 20, max_chars=100)
        hits.update(sample)
    for i in range(200):  # each line is kept with probability 20/200
        assert within_binomial(hits[f"xx-{i}"], runs, 0.1), i


def test_sample_sentences_with_temperature_and_shortfall(tmp_path):
    sources = corpus(tmp_path, {"as": 50, "en": 5000})
    mixture = MixtureConfig(sources, sampling="temperature", alpha=0.3)
    sizes = source_sizes(sources)
    assert sizes == [50, 5000]
    sample, record = sample_sentences(mixture, 400, max_chars=100)
    p = mixture_probabilities(mixture, sizes)
    assert [r["probability"] for r in record["sources"]] == p
    want = quotas(p, 400)
    assert want[0] > 50  # more than the source holds: it gives all it has
    assert [r["drawn"] for r in record["sources"]] == [50, want[1]]
    assert len(sample) == 50 + want[1]
