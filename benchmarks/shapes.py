"""What each measurement runs, at three sizes: `smoke` (seconds, for CI), `cpu` (tiny models, minutes
on 2 cores) and `gpu` (the shapes the issue names: Gemma 3 270M with a 50k and its own 262k
vocabulary, a Llama/GPT-2 124M, seed 001's BERT, B 16 x T 1024)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainingCase:
    name: str
    model: dict
    """A [model] table: a preset and fields beside it."""
    batch: int
    seq_len: int
    objective: str = "clm"
    """clm (decoders) or mlm (encoders)."""


@dataclass
class DecodingCase:
    name: str
    model: dict
    batches: tuple[int, ...]
    prompt: int
    new: int


@dataclass
class LossCase:
    tokens: int
    vocab: int
    hidden: int
    dtypes: tuple[str, ...]


@dataclass
class DataCase:
    megabytes: float
    vocab: int


@dataclass
class ShapeSet:
    name: str
    training: list[TrainingCase]
    decoding: list[DecodingCase]
    loss: list[LossCase]
    data: DataCase | None
    dtype: str
    """Training and decoding precision: float32, or bfloat16 = bf16 autocast with fp32 weights."""
    rounds: int = 3
    """Interleaved rounds per measurement; medians are reported (at least 3 except in smoke)."""
    steps: int = 3
    """Training steps per round and side."""
    matmul_size: int = 1024
    notes: list[str] = field(default_factory=list)


# Llama with GPT-2 124M's sizes: 12 x 768, 12 heads, tied 50,304 vocabulary; SwiGLU 2048 has the
# parameters of GPT-2's 3072-wide MLP.
LLAMA_124M = dict(family="llama", vocab_size=50_304, hidden_size=768, num_layers=12, num_heads=12,
                  num_kv_heads=12, intermediate_size=2048, max_seq_len=1024, tie_embeddings=True)
# A Gemma 3 270M-like decoder of gemma3-tiny's size with the real 262k vocabulary: the case where the
# output layer and the loss dominate (issue 17: 0.76x-0.91x on CPU before the loss fix).
GEMMA3_TINY_262K = dict(preset="gemma3-tiny", vocab_size=262_144, max_seq_len=512)

SHAPES: dict[str, ShapeSet] = {
    "smoke": ShapeSet(
        name="smoke",
        training=[
            TrainingCase("gemma3 smoke", dict(preset="gemma3-tiny", vocab_size=512, hidden_size=32, num_layers=2,
                                              num_heads=2, head_dim=16, intermediate_size=64, sliding_window=8,
                                              global_every=2, query_pre_attn_scalar=16.0), 2, 16),
            TrainingCase("bert smoke", dict(preset="bert-tiny", vocab_size=512, hidden_size=32, num_layers=1,
                                            intermediate_size=64, dropout=0.0), 2, 16, objective="mlm"),
        ],
        decoding=[DecodingCase("llama smoke", dict(preset="test-tiny", vocab_size=256, max_seq_len=64),
                               (1, 2), 8, 8)],
        loss=[LossCase(tokens=64, vocab=4096, hidden=32, dtypes=("float32",))],
        data=DataCase(megabytes=0.05, vocab=400),
        dtype="float32", rounds=1, steps=1, matmul_size=128,
    ),
    "cpu": ShapeSet(
        name="cpu",
        training=[
            TrainingCase("gemma3-tiny vocab 4,096", dict(preset="gemma3-tiny"), 4, 128),
            TrainingCase("gemma3-tiny vocab 262,144", GEMMA3_TINY_262K, 4, 128),
            TrainingCase("llama-tiny vocab 50,304", dict(preset="llama-tiny", vocab_size=50_304), 4, 128),
            TrainingCase("bert-10m (seed 001), MLM", dict(preset="bert-10m"), 8, 128, objective="mlm"),
        ],
        decoding=[
            DecodingCase("llama-tiny", dict(preset="llama-tiny", max_seq_len=512), (1, 8), 128, 256),
            DecodingCase("gemma3-tiny (window 64)", dict(preset="gemma3-tiny", max_seq_len=512), (1, 8), 128, 256),
            # Issue 17 (c): with a full cache, sliding layers attend to the whole context; the ring keeps
            # them at the window however long the prompt.
            DecodingCase("gemma3-tiny (window 64), long prompt", dict(preset="gemma3-tiny", max_seq_len=1280), (1,),
                         1024, 256),
        ],
        loss=[LossCase(tokens=2048, vocab=262_144, hidden=640, dtypes=("float32", "bfloat16"))],
        data=DataCase(megabytes=8.0, vocab=8000),
        dtype="float32", rounds=3, steps=2, matmul_size=1024,
    ),
    "gpu": ShapeSet(
        name="gpu",
        training=[
            TrainingCase("gemma3-270m vocab 50,000", dict(preset="gemma3-270m", vocab_size=50_000, max_seq_len=1024),
                         16, 1024),
            TrainingCase("gemma3-270m vocab 262,144", dict(preset="gemma3-270m", max_seq_len=1024), 16, 1024),
            TrainingCase("llama 124m (GPT-2 shape) vocab 50,304", LLAMA_124M, 16, 1024),
            TrainingCase("bert-10m (seed 001), MLM", dict(preset="bert-10m"), 32, 512, objective="mlm"),
        ],
        decoding=[
            DecodingCase("gemma3-270m", dict(preset="gemma3-270m", max_seq_len=1024), (1, 32), 128, 256),
            DecodingCase("llama 124m", LLAMA_124M, (1, 32), 128, 256),
            DecodingCase("gemma3-270m, long prompt", dict(preset="gemma3-270m", max_seq_len=4352), (1,), 4096, 256),
        ],
        loss=[LossCase(tokens=16 * 1024, vocab=262_144, hidden=640, dtypes=("bfloat16", "float32"))],
        data=DataCase(megabytes=24.0, vocab=16000),
        dtype="bfloat16", rounds=5, steps=5, matmul_size=8192,
    ),
}
