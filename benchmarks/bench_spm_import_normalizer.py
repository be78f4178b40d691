"""What composing decomposed vowel signs costs when encoding with an imported SentencePiece model.

`slmforge tokenizer import model.model` puts Replace steps before `tokenizers`' `Precompiled`
normalizer (see spm_convert.py) so that text typed decomposed (Bengali ো as ে + া, ...) gets
SentencePiece's ids. Baseline: the same pipeline without those steps (what transformers' converter
builds). Both encode the same lines; the ids agree on text that is already composed, and only the
imported pipeline agrees with SentencePiece on decomposed text (both checked here).

    python benchmarks/bench_spm_import_normalizer.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import unicodedata
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

UDHR = Path(__file__).resolve().parents[1] / "tests" / "data" / "udhr"


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200, help="copies of the UDHR excerpts to encode")
    args = parser.parse_args()

    import sentencepiece

    from slmforge.tokenizer import import_tokenizer, load_tokenizer

    lines = [line for path in sorted(UDHR.glob("*.txt")) for line in path.read_text(encoding="utf-8").splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), model_type="unigram", vocab_size=700,
            character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
        sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(tmp) / "sp.model"))
        ours = load_tokenizer(import_tokenizer(Path(tmp) / "sp.model", Path(tmp) / "tok")).backend
    data = json.loads(ours.to_str())
    steps = data["normalizer"]["normalizers"]
    data["normalizer"]["normalizers"] = [step for step in steps if not _composition(step)]
    baseline = BackendTokenizer.from_str(json.dumps(data))
    compositions = len(steps) - len(data["normalizer"]["normalizers"])

    composed = [unicodedata.normalize("NFC", line) for line in lines]
    decomposed = [unicodedata.normalize("NFD", line) for line in lines]
    same_composed = all(a.ids == b.ids for a, b in zip(ours.encode_batch(composed), baseline.encode_batch(composed)))
    ours_right = sum(e.ids == sp.encode(t) for e, t in zip(ours.encode_batch(decomposed, add_special_tokens=False), decomposed))
    base_right = sum(e.ids == sp.encode(t) for e, t in zip(baseline.encode_batch(decomposed, add_special_tokens=False), decomposed))

    text = lines * args.repeat
    megabytes = sum(len(t.encode("utf-8")) for t in text) / 1e6
    t_base = best_of(lambda: baseline.encode_batch_fast(text))
    t_ours = best_of(lambda: ours.encode_batch_fast(text))
    print(f"{len(text):,} lines, {megabytes:.1f} MB (UDHR excerpts: hi, bn, mr, ta, de, en), "
          f"{compositions} composition steps")
    print(f"baseline, Precompiled alone:           {megabytes / t_base:8.2f} MB/s   "
          f"SentencePiece's ids on decomposed lines: {base_right}/{len(lines)}")
    print(f"slmforge import, compositions first:   {megabytes / t_ours:8.2f} MB/s   "
          f"SentencePiece's ids on decomposed lines: {ours_right}/{len(lines)}")
    print(f"encode time ratio: {t_ours / t_base:.2f}x   same ids on composed (NFC) lines: {same_composed}")


def _composition(step: dict) -> bool:
    """One of the Replace steps that compose a decomposed sequence (not the whitespace ones)."""
    if step["type"] != "Replace":
        return False
    pattern = step["pattern"].get("String")
    return pattern is not None and len(pattern) > 1 and unicodedata.normalize("NFC", pattern) == step["content"]


if __name__ == "__main__":
    main()
