"""Named model shapes. Each is a dict of `ModelConfig` fields; anything given beside a preset wins.

Sources: Gemma 3 270M from google/gemma-3-270m's config.json; Llama shapes follow the seed-002
"150M from scratch" write-up (GQA, RoPE, SwiGLU, pre-norm); the tiny ones exist for CPU tests.
"""

from __future__ import annotations

from typing import Any

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
    "llama-50m": dict(
        family="llama", vocab_size=32_000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
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
}
