"""Named model shapes of every family. Each is a dict of config fields, `family` included (it picks the
config class); anything given beside a preset wins.

Sources: Gemma 3 270M from google/gemma-3-270m's config.json; Llama shapes follow the seed-002
"150M from scratch" write-up (GQA, RoPE, SwiGLU, pre-norm); BERT, XLM-R and ModernBERT base shapes from
their config.json files; seed 001's BERT and seed 004's student from their write-ups; T5 v1.1 small/base
from google/t5-v1_1-* config.json; Qwen3 0.6B from Qwen/Qwen3-0.6B's config.json; SmolLM3 3B from
HuggingFaceTB/SmolLM3-3B's shape; the tiny ones exist for CPU tests.
"""

from __future__ import annotations

from typing import Any, ClassVar

from slmforge.errors import ConfigError

DEFAULT_FAMILY = "llama"

_GEMMA3 = dict(
    family="gemma3", activation="gelu_tanh", norm_unit_offset=True, sandwich_norm=True, qk_norm=True,
    embed_scale=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0, global_every=6,
    tie_embeddings=True, norm_eps=1e-6,
)

PRESETS: dict[str, dict[str, Any]] = {
    # 18 layers, hidden 640, 4 heads of 256, 1 KV head, GeGLU 2048, window 512 on 5 of every 6 layers.
    "gemma3-270m": dict(
        _GEMMA3, vocab_size=262_144, hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, intermediate_size=2048, max_seq_len=32_768, sliding_window=512,
        query_pre_attn_scalar=256.0,
    ),
    # Seed 003: the 270M shape with a 50k Hindi vocabulary and 1024 context.
    "gemma3-270m-hindi": dict(
        _GEMMA3, vocab_size=50_000, hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, intermediate_size=2048, max_seq_len=1024, sliding_window=512,
        query_pre_attn_scalar=256.0,
    ),
    # A Gemma 3-shaped model small enough for a CPU quickstart (~1M non-embedding parameters).
    "gemma3-tiny": dict(
        _GEMMA3, vocab_size=4096, hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=1,
        head_dim=32, intermediate_size=384, max_seq_len=256, sliding_window=64,
        query_pre_attn_scalar=32.0,
    ),
    # Seed 002: ~150M Llama-style decoder (GQA 12:4, SwiGLU, RoPE, pre-norm), 32k vocabulary, untied.
    "llama-150m": dict(
        family="llama", vocab_size=32_000, hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4,
        intermediate_size=2048, max_seq_len=1024, rope_theta=10_000.0, tie_embeddings=False,
    ),
    # 12 blocks of 2.95M plus the tied 32k x 512 embedding: 51.8M (with 8 blocks it was 40M).
    "llama-50m": dict(
        family="llama", vocab_size=32_000, hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4,
        intermediate_size=1408, max_seq_len=1024, tie_embeddings=True,
    ),
    "llama-tiny": dict(
        family="llama", vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=352, max_seq_len=256, tie_embeddings=True,
    ),
    # For unit tests: a few thousand parameters, trains in seconds.
    "test-tiny": dict(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_seq_len=64, tie_embeddings=True,
    ),
    # Qwen/Qwen3-0.6B: Llama + QK-norm, 28 layers, hidden 1024, 16 heads of 128 (not 1024 / 16), 8 KV heads.
    "qwen3-0.6b": dict(
        family="qwen3", qk_norm=True, vocab_size=151_936, hidden_size=1024, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, intermediate_size=3072, max_seq_len=40_960, rope_theta=1_000_000.0,
        norm_eps=1e-6, tie_embeddings=True,
    ),
    "qwen3-tiny": dict(
        family="qwen3", qk_norm=True, vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=48, intermediate_size=352, max_seq_len=256, rope_theta=1_000_000.0,
        tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM3-3B's shape: Llama + no RoPE on every 4th layer, GQA 16:4, tied, RoPE base 5M.
    "smollm3-3b": dict(
        family="smollm3", nope_every=4, vocab_size=128_256, hidden_size=2048, num_layers=36, num_heads=16,
        num_kv_heads=4, intermediate_size=11_008, max_seq_len=65_536, rope_theta=5_000_000.0, norm_eps=1e-6,
        tie_embeddings=True,
    ),
    "smollm3-tiny": dict(
        family="smollm3", nope_every=4, vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, intermediate_size=352, max_seq_len=256, rope_theta=5_000_000.0, tie_embeddings=True,
    ),
    # ---- encoders (masked LM)
    # Seed 001: 3 layers, hidden 256, 4 heads, FFN 1024, 512 positions, dropout 0.1 (~10M with 30k vocab).
    "bert-10m": dict(
        family="bert", vocab_size=30_522, hidden_size=256, num_layers=3, num_heads=4, intermediate_size=1024,
        max_seq_len=512, dropout=0.1,
    ),
    "bert-base": dict(
        family="bert", vocab_size=30_522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_seq_len=512, dropout=0.1,
    ),
    # Seed 004's teacher shape: XLM-RoBERTa base, 250,002 ids, positions offset by padding_idx + 1.
    "xlmr-base": dict(
        family="roberta", vocab_size=250_002, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, max_seq_len=512, pad_token_id=1, dropout=0.1,
    ),
    "modernbert-base": dict(
        family="modernbert", vocab_size=50_368, hidden_size=768, num_layers=22, num_heads=12,
        intermediate_size=1152, max_seq_len=8192, local_window=128, global_every=3, pad_token_id=50_283,
    ),
    # Seed 004's ~33M Hindi student, in ModernBERT's layout (RoPE, GeGLU, pre-norm, local/global), 32k vocab.
    "modernbert-hindi-33m": dict(
        family="modernbert", vocab_size=32_000, hidden_size=512, num_layers=8, num_heads=8,
        intermediate_size=768, max_seq_len=1024, local_window=128, global_every=3,
    ),
    "bert-tiny": dict(
        family="bert", vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_seq_len=128, dropout=0.0,
    ),
    "roberta-tiny": dict(
        family="roberta", vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_seq_len=128, dropout=0.0,
    ),
    "modernbert-tiny": dict(
        family="modernbert", vocab_size=4096, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
        max_seq_len=128, local_window=16, global_every=3,
    ),
    # ---- encoder-decoders (span corruption, translation)
    # T5 v1.1 shapes from google/t5-v1_1-small and -base config.json: gated GELU, d_kv 64, 32 relative
    # position buckets up to distance 128, untied head, 32,128 ids (32k SentencePiece + 100 sentinels + padding).
    "t5-small": dict(
        family="t5", vocab_size=32_128, hidden_size=512, num_layers=8, num_heads=6, head_dim=64,
        intermediate_size=1024, max_seq_len=512,
    ),
    "t5-base": dict(
        family="t5", vocab_size=32_128, hidden_size=768, num_layers=12, num_heads=12, head_dim=64,
        intermediate_size=2048, max_seq_len=512,
    ),
    # Seed 002's ~150M translator in modern blocks: 9 + 9 layers of the llama-150m width (GQA 12:4, RoPE,
    # SwiGLU 2048, pre-norm), one 32k embedding shared by encoder, decoder and head: 152M parameters.
    "encdec-150m": dict(
        family="encdec", vocab_size=32_000, hidden_size=768, num_layers=9, num_heads=12, num_kv_heads=4,
        intermediate_size=2048, max_seq_len=512,
    ),
    "t5-tiny": dict(
        family="t5", vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
        intermediate_size=128, max_seq_len=256, relative_buckets=16, relative_max_distance=32,
    ),
    "encdec-tiny": dict(
        family="encdec", vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_seq_len=256,
    ),
}


def family_of(data: dict[str, Any]) -> str:
    """The family a [model] table describes: its own `family`, else its preset's, else llama."""
    if data.get("family") is not None:
        return data["family"]
    name = data.get("preset")
    if name is not None and name in PRESETS:
        return PRESETS[name].get("family", DEFAULT_FAMILY)
    return DEFAULT_FAMILY


def expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    """`preset = "x"` becomes the preset's fields; fields given beside it win."""
    name = data.get("preset")
    if name is None:
        return data
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **data}


class PresetConfig:
    """Config-loading hooks every model family's config dataclass shares: in a recipe's [model] table
    `family` (or the preset's family) picks the class, and `preset = "x"` expands to its fields."""

    TAG: ClassVar[str] = "family"

    @classmethod
    def tag_of(cls, data: dict[str, Any]) -> str:
        return family_of(data)

    @classmethod
    def expand_config(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`preset = "x"` becomes the preset's fields; fields given beside it win."""
        return expand_preset(data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any):
        """A preset with some fields changed, validated like a config file."""
        from slmforge.config import from_dict

        return from_dict(cls, {"preset": name, **overrides}, "model")
