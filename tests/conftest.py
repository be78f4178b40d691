"""Shared test helpers: synthetic token sources and shard folders written without a tokenizer."""

from __future__ import annotations

from contextlib import contextmanager

from pathlib import Path

import numpy as np
import pytest

from slmforge.data.shards import FORMAT, ShardWriter, dtype_for_vocab
from slmforge.fileio import write_json_atomic


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test models are tiny: a second intra-op thread gains nothing, and on a 2-core machine where
    something else is running the two threads wait on each other. Measured next to one busy process:
    the quickstart test took 48 s with torch's default of 2 threads, 9 s with 1 (5 s on an idle machine);
    test_train, test_quickstart, test_mlm and test_generate together took 588 s against 89 s and 103 s."""
    import os

    import torch

    # Training picks its threads from the machine's load unless OMP_NUM_THREADS says (runtime.py): the
    # suite says 1, for the same reason, and spares each training start the load measurement.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_shards(folder: Path, splits: dict[str, list[np.ndarray]], vocab_size: int) -> Path:
    """A prepared-data folder holding the given documents (token arrays) per split."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    manifest = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size, "splits": {}}
    for split, documents in splits.items():
        writer = ShardWriter(folder, split, dtype, shard_tokens=4096)
        for doc in documents:
            writer.add(doc, text_bytes=len(doc))  # pretend one byte per token
        shards = writer.close()
        manifest["splits"][split] = {
            "shards": [vars(s) for s in shards],
            "tokens": sum(s.tokens for s in shards),
            "documents": sum(s.documents for s in shards),
            "bytes": sum(s.bytes for s in shards),
        }
    write_json_atomic(folder / "manifest.json", manifest)
    return folder


class MarkovSource:
    """A random first-order Markov chain over `vocab` tokens with a known entropy rate (nats/token)."""

    def __init__(self, vocab: int, seed: int = 0, concentration: float = 0.3):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.transition = rng.dirichlet(np.full(vocab, concentration), size=vocab)  # (V, V) rows sum to 1
        eigvals, eigvecs = np.linalg.eig(self.transition.T)
        stationary = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1))])
        self.stationary = stationary / stationary.sum()
        row_entropy = -(self.transition * np.log(self.transition + 1e-300)).sum(axis=1)
        self.entropy_rate = float((self.stationary * row_entropy).sum())

    def sample(self, length: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty(length, dtype=np.int64)
        state = rng.choice(self.vocab, p=self.stationary)
        cumulative = np.cumsum(self.transition, axis=1)
        draws = rng.random(length)
        for i in range(length):
            out[i] = state
            state = min(int(np.searchsorted(cumulative[state], draws[i])), self.vocab - 1)
        return out


@pytest.fixture
def markov_shards(tmp_path):
    source = MarkovSource(vocab=16, seed=0)
    folder = write_shards(tmp_path / "data", {
        "train": [source.sample(60_000, seed=1)],
        "val": [source.sample(8_000, seed=2)],
    }, vocab_size=16)
    return source, folder


SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"}


def word_level_tokenizer(folder: Path, words: list[str]):
    """A saved tokenizer whose ids are the five BERT specials (0-4), then `words` (5, 6, ...)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from slmforge.tokenizer import Tokenizer

    vocab = {token: i for i, token in enumerate([*SPECIALS.values(), *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIALS.values()))
    tokenizer = Tokenizer(backend, roles=dict(SPECIALS), meta={"kind": "wordlevel"})
    tokenizer.save(folder)
    return tokenizer


@pytest.fixture
def mlm_markov_shards(tmp_path):
    """The Markov chain of `markov_shards` as token ids 5..20 of a word-level tokenizer with a [MASK]."""
    import json

    source = MarkovSource(vocab=16, seed=0)
    tokenizer = word_level_tokenizer(tmp_path / "tokenizer", [f"s{i}" for i in range(16)])
    folder = write_shards(tmp_path / "data", {
        "train": [source.sample(60_000, seed=1) + 5],
        "val": [source.sample(8_000, seed=2) + 5],
    }, vocab_size=tokenizer.vocab_size)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": str(tmp_path / "tokenizer"), "sha256": tokenizer.sha256}
    manifest["pad_id"] = tokenizer.pad_id
    write_json_atomic(folder / "manifest.json", manifest)
    return source, folder


@contextmanager
def crash_at_step(monkeypatch, step: int):
    """Training fails when it reaches `step` inside the block (as a crash would there); the block
    expects that failure. Outside it, training runs as usual again."""
    from slmforge.train.trainer import Trainer

    original = Trainer.train_step

    def crashing(self):
        if self.state.step == step:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        monkeypatch.setattr(Trainer, "train_step", original)


def untimed(run: Path) -> list[dict]:
    """A run's metrics.jsonl without the wall-clock fields (tokens/s, elapsed time), which no two runs
    share: what a resumed run must reproduce exactly."""
    from slmforge.train.metrics import TIMING_FIELDS, read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run / "metrics.jsonl")]


def assert_same_run(first: Path, second: Path, step: int) -> None:
    """Two runs (e.g. straight and killed-and-resumed) ended alike: the step's weights bit for bit and the
    metrics without their wall-clock fields."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors") for run in (first, second))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(first) == untimed(second)


def launch(processes: int, *args: str, verb: str = "pretrain"):
    """`slmforge VERB ARGS` under torchrun with `processes` CPU workers (gloo), or plainly for 1; the
    completed process (asserted to have succeeded)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if processes == 1:
        command = [sys.executable, "-m", "slmforge", verb, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "slmforge", verb, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def random_decoder(family: str, vocab: int, window: int):
    """A tiny Llama ("llama") or Gemma 3 ("gemma3": local layers of `window` tokens, softcap) decoder in
    eval mode, with weights large enough that a wrong cache key, slot or position moves the logits
    visibly (the decoding tests compare paths that must agree)."""
    from slmforge.models import DecoderConfig, build_model

    if family == "gemma3":
        cfg = DecoderConfig.from_name("gemma3-tiny", vocab_size=vocab, hidden_size=64, num_layers=4, num_heads=4,
                                      num_kv_heads=2, head_dim=16, intermediate_size=96, sliding_window=window,
                                      global_every=2, query_pre_attn_scalar=16.0, final_logit_softcap=30.0,
                                      max_seq_len=64)
    else:
        cfg = DecoderConfig.from_name("llama-tiny", vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4,
                                      num_kv_heads=2, intermediate_size=96, max_seq_len=64)
    model = build_model(cfg, seed=0).eval()
    randomize_weights(model, seed=1)
    return model


def randomize_weights(model, seed: int, vector_mean: float = 0.0) -> None:
    """Noise in place of `model`'s weights, large enough that a wrong cache key, slot, position or weight
    mapping moves the outputs visibly: matrices N(0, 1/fan_in), vectors (norm scales, biases)
    `vector_mean` + 0.3 N(0, 1) (1 puts norm scales around 1 where the model does not add it itself)."""
    import torch

    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(vector_mean + 0.3 * noise if param.ndim == 1 else noise / param.shape[-1] ** 0.5)


def markov_run_data(folder: Path, source: "MarkovSource", words: list[str]):
    """The data folder for pretraining on `source`'s chain: a word-level tokenizer over `words`
    (5 special ids first, so token i of the chain is id i + 5) and prepared train/val shards whose
    manifest names that tokenizer, as `data prepare` leaves them."""
    import json

    tokenizer = word_level_tokenizer(folder / "tokenizer", words)
    data = write_shards(folder / "data", {"train": [source.sample(12_000, seed=1) + 5],
                                          "val": [source.sample(2_000, seed=2) + 5]}, vocab_size=tokenizer.vocab_size)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(tokenizer={"path": str(folder / "tokenizer"), "sha256": tokenizer.sha256}, pad_id=0, bos_id=3,
                    eos_id=4)
    write_json_atomic(data / "manifest.json", manifest)
    return data
