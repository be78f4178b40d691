"""Mixing sources: how much of each language to draw, in which order.

Probabilities come from explicit weights (normalized) or from temperature sampling over source sizes,
p_i ∝ n_i^α (Lample & Conneau 2019, XLM; XLM-R uses α = 0.3): α < 1 raises the share of small
languages, α = 1 keeps natural proportions, α = 0 is uniform.

Two consumers:
- `sample_sentences` draws a fixed-size sample (e.g. 100,000 sentences to train a tokenizer) with one
  reservoir per source, so memory holds only the sample.
- `Interleaver` orders training documents: each draw picks a source by the probabilities from a
  seeded stream of uniforms, so the same seed always gives the same order, and a run resumes from a
  draw count instead of a saved RNG.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from slmforge.config import require
from slmforge.text.sampling import reservoir_sample
from slmforge.text.sources import SourceConfig, SourceReader


@dataclass
class MixtureConfig:
    """Which sources to mix and how."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Inputs, e.g. `[{path = "as.txt", lang = "as", weight = 0.5}, {path = "hi/", lang = "hi"}]`."""
    sampling: Literal["ratio", "temperature"] = "ratio"
    """`ratio`: shares are the sources' weights (or their sizes if no weights are given).
    `temperature`: p_i ∝ n_i^alpha over the sources' document counts (XLM-R)."""
    alpha: float = 0.3
    """Temperature exponent for sampling = "temperature" (XLM-R: 0.3; 1 = natural, 0 = uniform)."""
    seed: int = 0
    """Seed of the mixing order and of the validation split."""
    stop: Literal["all_exhausted", "first_exhausted"] = "all_exhausted"
    """When the mixed stream ends. `all_exhausted`: an exhausted source drops out and the others keep
    their relative shares, so every document is used once. `first_exhausted`: stop when any source runs
    out, so the whole stream keeps the mixture's proportions."""

    def validate(self) -> None:
        require(len(self.sources) > 0, "sources", "give at least one source, e.g. "
                "sources = [{path = \"corpus.txt\"}] or --input corpus.txt")
        weighted = [s.weight is not None for s in self.sources]
        require(all(weighted) or not any(weighted), "sources",
                "set weight on every source or on none")
        require(self.sampling == "ratio" or not any(weighted), "sampling",
                "temperature sampling derives shares from source sizes; remove the sources' weights")
        require(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def needs_sizes(mixture: MixtureConfig) -> bool:
    """True when the probabilities depend on how many documents each source holds (never for one source)."""
    if len(mixture.sources) == 1:
        return False
    return mixture.sampling == "temperature" or any(s.weight is None for s in mixture.sources)


def mixture_probabilities(mixture: MixtureConfig, sizes: Sequence[int] | None = None) -> list[float]:
    """Probability of drawing from each source: normalized weights, or n_i^α / Σ_j n_j^α."""
    weights = [s.weight for s in mixture.sources]
    if len(weights) == 1:
        return [1.0]  # a single source is the whole mixture, whatever its size
    if mixture.sampling == "ratio" and all(w is not None for w in weights):
        total = float(sum(weights))  # type: ignore[arg-type]
        return [float(w) / total for w in weights]  # type: ignore[arg-type]
    if sizes is None or len(sizes) != len(weights):
        raise ValueError("mixture_probabilities: source sizes are needed for this mixture")
    exponent = mixture.alpha if mixture.sampling == "temperature" else 1.0
    scaled = [float(n) ** exponent for n in sizes]
    total = sum(scaled)
    return [x / total for x in scaled]


def source_sizes(sources: Sequence[SourceConfig]) -> list[int]:
    """Documents in each source, counted by reading it once (needed for size-based shares)."""
    sizes = []
    for source in sources:
        reader = SourceReader(source)
        for _ in reader:
            pass
        sizes.append(reader.stats.documents)
    return sizes


def quotas(probabilities: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to `total`, proportional to `probabilities` (largest remainder)."""
    exact = [p * total for p in probabilities]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_sentences(mixture: MixtureConfig, total: int, max_chars: int,
                     sizes: Sequence[int] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Draw `total` documents (lines, for text_unit = "line") across sources by the mixture.

    Each source gets round(total * p_i) of them, chosen uniformly from the whole source by reservoir
    sampling (memory: the sample only); a document longer than `max_chars` characters counts as its pieces
    of at most that length, cut at a space or a letter-cluster boundary. A source with fewer
    documents than its quota gives all it has; the record says so. The result is shuffled (seeded).
    """
    if sizes is None and needs_sizes(mixture):
        sizes = source_sizes(mixture.sources)
    probabilities = mixture_probabilities(mixture, sizes)
    wanted = quotas(probabilities, total)
    sample: list[str] = []
    record: dict[str, Any] = {"requested": total, "sampling": mixture.sampling, "alpha": mixture.alpha,
                              "seed": mixture.seed, "max_chars": max_chars, "sources": []}
    for index, (source, p, k) in enumerate(zip(mixture.sources, probabilities, wanted)):
        reader = SourceReader(source)
        drawn, kept = reservoir_sample([(source.path, reader)], k, max_chars,
                                       seed=f"slmforge-sample:{mixture.seed}:{index}")
        sample.extend(drawn)
        record["sources"].append({
            "path": source.path, "lang": source.lang, "probability": p, "requested": k,
            "drawn": len(drawn), "available": kept["sources"][0]["sentences"],
            "split": kept["sources"][0]["split"], "skipped": dict(reader.stats.skipped),
            "chars": sum(len(t) for t in drawn),
        })
    random.Random(f"slmforge-sample:{mixture.seed}").shuffle(sample)
    record["drawn"] = len(sample)
    return sample, record


class Interleaver:
    """A deterministic mixed stream of `(source index, document)` over `readers`.

    Draw k uses the k-th uniform of a stream seeded by `seed` (generated in blocks, so resuming needs
    only `draws`); an exhausted source drops out per `stop`. `state()` plus the readers' cursors and
    stats restore the stream exactly.
    """

    BLOCK = 4096

    def __init__(self, readers: Sequence[SourceReader], probabilities: Sequence[float], seed: int,
                 stop: str = "all_exhausted", state: dict[str, Any] | None = None):
        self.readers = list(readers)
        self.probabilities = list(probabilities)
        self.seed = seed
        self.stop = stop
        state = state or {}
        self.draws = int(state.get("draws", 0))
        self.exhausted = set(state.get("exhausted", []))
        self.finished = bool(state.get("finished", False))
        self._block_index = -1
        self._block: list[float] = []

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws, "exhausted": sorted(self.exhausted), "finished": self.finished}

    def drawn_elsewhere(self, documents: int, finished: bool = False) -> None:
        """Count `documents` of a one-source stream that were read without iterating it (`data prepare`'s
        workers read a single source by byte ranges) and, with `finished`, its end: the state is then
        the one iterating would have left (a single source is drawn every time; one more draw finds it
        exhausted)."""
        if len(self.readers) != 1:
            raise ValueError("drawn_elsewhere: only a one-source stream is drawn in a known order")
        self.draws += documents
        if finished and not self.finished:
            self.draws += 1
            self.exhausted.add(0)
            self.finished = True

    def _uniform(self, k: int) -> float:
        block = k // self.BLOCK
        if block != self._block_index:
            self._block = np.random.default_rng([self.seed, block]).random(self.BLOCK).tolist()
            self._block_index = block
        return self._block[k % self.BLOCK]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        iterators = [iter(r) for r in self.readers]
        while not self.finished:
            active = [i for i in range(len(self.readers)) if i not in self.exhausted]
            if not active:
                self.finished = True
                break
            cumulative = np.cumsum([self.probabilities[i] for i in active]).tolist()
            while True:
                u = self._uniform(self.draws) * cumulative[-1]
                self.draws += 1
                pick = active[min(bisect.bisect_right(cumulative, u), len(active) - 1)]
                try:
                    text = next(iterators[pick])
                except StopIteration:
                    self.exhausted.add(pick)
                    if self.stop == "first_exhausted":
                        self.finished = True
                    break
                yield pick, text
