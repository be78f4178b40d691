"""`EncDecConfig`: encoder-decoder transformers (a bidirectional encoder, a causal decoder that also
attends to the encoder's output through cross-attention, one shared embedding), in two layouts.

    family   layout                                                             reference
    t5       T5 v1.1: pre-norm RMSNorm (no mean, no bias), relative position     T5ForConditionalGeneration
             bias (log buckets, computed in the first layer and shared by the
             rest), gated GELU, no biases, no 1/sqrt(d) attention scaling,
             untied output head (tied: T5 v1.0's d_model^-0.5 output scaling)
    encdec   seed 002's blocks: pre-norm RMSNorm, GQA, RoPE (self-attention     (no transformers class)
             only; cross-attention has no positions), SwiGLU, tied head

`models/hf/t5.py` maps the `t5` family to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from slmforge.config import require
from slmforge.models.presets import PresetConfig

# A field left unset takes its family's value.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5": dict(activation="gelu_tanh", tie_embeddings=False),
    "encdec": dict(activation="silu", tie_embeddings=True),
}


@dataclass
class EncDecConfig(PresetConfig):
    preset: str | None = None
    """Named starting point (see `slmforge pretrain --list-presets`); fields set beside it override it."""
    family: Literal["t5", "encdec"] = "encdec"
    """Block layout: t5 (T5 v1.1, Hugging Face interop) or encdec (GQA, RoPE, SwiGLU; see this module)."""
    vocab_size: int = 32000
    """Number of token ids (shared by encoder and decoder); set automatically from the tokenizer."""
    hidden_size: int = 512
    """Width of the residual stream (T5's d_model)."""
    num_layers: int = 6
    """Encoder blocks."""
    num_decoder_layers: int | None = None
    """Decoder blocks; default num_layers."""
    num_heads: int = 8
    """Query heads per attention layer."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention, encdec only); default num_heads."""
    head_dim: int | None = None
    """Width of one head (T5's d_kv); default hidden_size / num_heads."""
    intermediate_size: int = 1408
    """Width of each half of the gated MLP (T5's d_ff)."""
    activation: Literal["silu", "gelu_tanh", "gelu"] | None = None
    """Gate activation: t5 gelu_tanh (T5 v1.1's gated-gelu), encdec silu (SwiGLU)."""
    max_seq_len: int = 512
    """Longest encoder input, and longest decoder sequence (decoder start token included)."""
    norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    relative_buckets: int = 32
    """t5: buckets of the relative position bias (half exact offsets, half log-spaced)."""
    relative_max_distance: int = 128
    """t5: offsets at or beyond this share the last bucket."""
    rope_theta: float = 10000.0
    """encdec: RoPE base of the self-attention layers."""
    tie_embeddings: bool | None = None
    """Output projection = the shared embedding matrix; default t5 false (v1.1), encdec true."""
    decoder_start_token_id: int = 0
    """First decoder input (T5 uses the pad id, 0); targets are shifted right behind it."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (T5 fine-tuning: 0.1)."""
    init_std: float = 0.02
    """encdec: standard deviation of the normal weight initialisation (t5 uses T5's own scheme)."""

    def __post_init__(self) -> None:
        for name, value in _FAMILY_DEFAULTS.get(self.family, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_decoder_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_seq_len"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        require(self.family != "t5" or self.num_kv_heads == self.num_heads, "num_kv_heads",
                f"t5 has one key/value head per query head ({self.num_heads}), got {self.num_kv_heads}")
        require(self.family != "encdec" or self.head_dim % 2 == 0, "head_dim",
                f"must be even for RoPE, got {self.head_dim}")
        require(self.relative_buckets >= 4, "relative_buckets", f"must be at least 4, got {self.relative_buckets}")
        require(self.relative_max_distance > self.relative_buckets // 2, "relative_max_distance",
                f"must exceed the decoder's exact-offset buckets (relative_buckets / 2 = {self.relative_buckets // 2})")
        require(0 <= self.decoder_start_token_id < self.vocab_size, "decoder_start_token_id",
                f"must be a token id below vocab_size ({self.vocab_size}), got {self.decoder_start_token_id}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")

    # ------------------------------------------------------------ layout switches

    @property
    def relative_bias(self) -> bool:
        return self.family == "t5"

    @property
    def rotary(self) -> bool:
        return self.family == "encdec"

    @property
    def attention_scale(self) -> float:
        """T5 folds 1/sqrt(d) into the initialisation of the query matrix (Mesh TensorFlow), so its
        attention scores are plain dot products; the modern layout scales as usual."""
        return 1.0 if self.family == "t5" else self.head_dim ** -0.5

    @property
    def output_scale(self) -> float | None:
        """T5 v1.0 (tied head) multiplies the decoder output by d_model^-0.5 before the vocabulary
        product; v1.1 (untied) does not, nor does the modern layout."""
        return self.hidden_size ** -0.5 if self.family == "t5" and self.tie_embeddings else None

    # ------------------------------------------------------------ derived quantities

    def num_parameters(self, include_embeddings: bool = True) -> int:
        from slmforge.models.registry import count_parameters

        return count_parameters(self, include_embeddings)

    def flops_per_token(self, seq_len: int, target_len: int | None = None) -> float:
        """Training FLOPs per encoder input token: 6N for the encoder, 6N x (targets per input) for the
        decoder and the head, plus attention. `target_len` defaults to span corruption's at 0.15 noise
        and mean span 3 (about 0.22 x seq_len)."""
        d, hd = self.hidden_size, self.head_dim
        q_kv = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.intermediate_size
        encoder = self.num_layers * (q_kv + mlp)
        decoder = self.num_decoder_layers * (2 * q_kv + mlp)
        if target_len is None:
            target_len = max(1, round(seq_len * 0.222))
        ratio = target_len / seq_len
        attn_width = 12 * self.num_heads * hd
        attn = self.num_layers * attn_width * seq_len  # bidirectional: the whole square
        attn += self.num_decoder_layers * attn_width * ratio * (target_len / 2 + seq_len)  # causal + cross
        return 6 * (encoder + (decoder + self.vocab_size * d) * ratio) + attn
