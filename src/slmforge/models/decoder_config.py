"""`DecoderConfig`: one dataclass describing every decoder slmforge builds.

A family ("llama", "gemma3", "qwen3", "smollm3") is a set of switches on the same decoder, not a separate
model class: Gemma 3 = Llama + QK-norm + sandwich norms + (1 + w) RMSNorm + √d embedding scale + GeGLU +
sliding/global layer pattern with two RoPE bases; Qwen3 = Llama + QK-norm; SmolLM3 = Llama + no RoPE on
every 4th layer. Which switches a family sets lives in its presets and in `models/hf/decoder.py`, which
maps each family to transformers; the model code reads only the switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slmforge.config import require
from slmforge.models.presets import PresetConfig


@dataclass
class DecoderConfig(PresetConfig):
    preset: str | None = None
    """Named starting point (see `slmforge pretrain --list-presets`); fields set beside it override it."""
    family: Literal["llama", "gemma3", "qwen3", "smollm3"] = "llama"
    """Block layout and weight names for Hugging Face interop."""
    vocab_size: int = 32000
    """Number of token ids; set automatically from the tokenizer when training."""
    hidden_size: int = 512
    """Width of the residual stream."""
    num_layers: int = 8
    """Number of transformer blocks."""
    num_heads: int = 8
    """Query heads per attention layer."""
    num_kv_heads: int = 8
    """Key/value heads (grouped-query attention); must divide num_heads. 1 = multi-query."""
    head_dim: int | None = None
    """Width of one head; default hidden_size / num_heads. Gemma 3 270M uses 256 with 4 heads at hidden 640."""
    intermediate_size: int = 1408
    """Width of the gated MLP."""
    activation: Literal["silu", "gelu_tanh"] = "silu"
    """Gate activation: silu = SwiGLU (Llama), gelu_tanh = GeGLU (Gemma)."""
    max_seq_len: int = 1024
    """Longest context the model is trained and generates with."""
    norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + weight) with weight initialised at 0 (Gemma), instead of weight at 1."""
    sandwich_norm: bool = False
    """Also normalise the outputs of attention and MLP before adding them to the residual (Gemma 2/3)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Gemma 3, Qwen3)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2; transformers' attention_bias sets both bias switches)."""
    out_bias: bool = False
    """A bias on the attention output projection."""
    embed_scale: bool = False
    """Multiply token embeddings by sqrt(hidden_size) (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by this ** -0.5; default head_dim (Gemma 3 sets it explicitly)."""
    rope_theta: float = 10000.0
    """RoPE base of full-attention layers."""
    nope_every: int = 0
    """Every n-th layer (n, 2n, ...) attends without RoPE ("NoPE"; SmolLM3: 4); 0 = RoPE on every layer."""
    nope_layers: list[int] | None = None
    """0-based indices of the layers without RoPE, in place of nope_every's pattern (an imported model's
    irregular pattern)."""
    rope_local_theta: float | None = None
    """RoPE base of sliding-window layers; default rope_theta (Gemma 3: 10,000 local, 1,000,000 global)."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """Context-extension scaling of RoPE frequencies on full-attention layers."""
    rope_scaling_factor: float = 1.0
    """Factor for linear / llama3 RoPE scaling."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths longer than original_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths shorter than original_len / this are left unscaled."""
    rope_original_max_seq_len: int = 8192
    """llama3 scaling: the context length the frequencies were trained for."""
    sliding_window: int | None = None
    """Tokens a sliding-window layer can see (itself included); None = every layer is global."""
    global_every: int = 1
    """With a sliding window: every n-th layer (n, 2n, ...) uses full attention, the rest are local."""
    layer_types: list[Literal["sliding_attention", "full_attention"]] | None = None
    """With a sliding window: each layer's attention, one entry per layer, in place of global_every's
    pattern (as in transformers' Gemma 3 `layer_types`, e.g. an imported model's irregular pattern)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    final_logit_softcap: float | None = None
    """If set, logits become cap * tanh(logits / cap) (Gemma 2 style)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (0 for pretraining at scale)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        if self.head_dim is None or self.head_dim == self.hidden_size // self.num_heads:
            require(self.hidden_size % self.num_heads == 0, "num_heads",
                    f"must divide hidden_size ({self.hidden_size}) unless head_dim is set, got {self.num_heads}")
        require(self.head_dim is not None and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                f"must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                f"must be positive or unset, got {self.sliding_window}")
        require(self.global_every >= 1, "global_every", f"must be >= 1, got {self.global_every}")
        require(self.nope_every >= 0, "nope_every", f"must be >= 0, got {self.nope_every}")
        require(all(0 <= i < self.num_layers for i in self.nope_layers or []), "nope_layers",
                f"must be layer indices 0..{self.num_layers - 1}, got {self.nope_layers}")
        if self.layer_types is not None:
            require(len(self.layer_types) == self.num_layers, "layer_types",
                    f"needs one entry per layer ({self.num_layers}), got {len(self.layer_types)}")
            require(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                    "layer_types", "has sliding_attention layers but sliding_window is unset")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.rope_scaling == "none" or self.rope_scaling_factor >= 1.0, "rope_scaling_factor",
                f"must be >= 1 when rope_scaling is set, got {self.rope_scaling_factor}")
        require(self.final_logit_softcap is None or self.final_logit_softcap > 0, "final_logit_softcap",
                "must be positive or unset")

    # ------------------------------------------------------------ derived quantities

    def is_sliding(self, layer: int) -> bool:
        """Gemma 3 pattern: with global_every=6, layers 5, 11, 17 (0-based) are global; layer_types,
        when set, names each layer's kind instead."""
        if self.sliding_window is None:
            return False
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return (layer + 1) % self.global_every != 0

    def uses_rope(self, layer: int) -> bool:
        """False for NoPE layers: nope_layers when set, else every nope_every-th layer (3, 7, ... with 4)."""
        if self.nope_layers is not None:
            return layer not in self.nope_layers
        return self.nope_every == 0 or (layer + 1) % self.nope_every != 0

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def scales_local_rope(self) -> bool:
        """Whether rope_scaling also stretches the sliding-window layers' RoPE: Gemma 3 applies it to
        its global layers only (transformers' Gemma3RotaryEmbedding for local layers has no scaling)."""
        return self.family != "gemma3"

    def num_parameters(self, include_embeddings: bool = True) -> int:
        d, hd, L = self.hidden_size, self.head_dim, self.num_layers
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * d * self.intermediate_size
        norms = d * (4 if self.sandwich_norm else 2) + (2 * hd if self.qk_norm else 0)
        attn += (hd * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0) + (d if self.out_bias else 0)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp + norms) + d + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N + attention), as in the PaLM appendix / nanoGPT's estimate_mfu."""
        n = self.num_parameters(include_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 0.0
        for layer in range(self.num_layers):
            span = min(seq_len, self.sliding_window) if self.is_sliding(layer) else seq_len
            attn += 12 * self.num_heads * self.head_dim * span / 2  # causal: half the square
        return 6 * n + attn
