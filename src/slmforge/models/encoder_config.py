"""`EncoderConfig`: bidirectional encoders for masked-LM pretraining, in three layouts.

    family       layout                                                      reference
    bert         post-norm LayerNorm, learned absolute positions, token      BertForMaskedLM
                 types, GELU MLP, biases everywhere
    roberta      BERT's blocks; positions count from padding_idx + 1 and     XLMRobertaForMaskedLM
                 skip padding; one token type                                (and RobertaForMaskedLM)
    modernbert   pre-norm LayerNorm without biases, RoPE, GeGLU, local       ModernBertForMaskedLM
                 (sliding) attention with every n-th layer global

Every layout ends in the BERT MLM head (dense + GELU + LayerNorm, then the tied embedding matrix
plus a bias), or, once fine-tuned for a task (`head = "classify"` or `"tag"`, `labels` naming the
classes), in a classification head (`models/heads.py`) as the family's *ForSequenceClassification /
*ForTokenClassification has it. `models/hf/encoder.py` maps each family to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from slmforge.config import require
from slmforge.models.presets import PresetConfig

# Defaults transformers' config classes use; a field left unset takes its family's value.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": dict(norm_eps=1e-12, type_vocab_size=2, dropout=0.1),
    "roberta": dict(norm_eps=1e-5, type_vocab_size=1, dropout=0.1),
    "modernbert": dict(norm_eps=1e-5, type_vocab_size=0, dropout=0.0),
}


@dataclass
class EncoderConfig(PresetConfig):
    preset: str | None = None
    """Named starting point (see `slmforge pretrain --list-presets`); fields set beside it override it."""
    family: Literal["bert", "roberta", "modernbert"] = "bert"
    """Block layout and weight names for Hugging Face interop (see the table in this module)."""
    vocab_size: int = 30522
    """Number of token ids; set automatically from the tokenizer when training."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per layer (hidden_size / num_heads wide each)."""
    intermediate_size: int = 1024
    """Width of the MLP (of each half of the gated MLP in modernbert)."""
    max_seq_len: int = 512
    """Longest input in tokens (learned position rows for bert/roberta)."""
    norm_eps: float | None = None
    """LayerNorm epsilon; default per family (bert 1e-12, roberta and modernbert 1e-5)."""
    type_vocab_size: int | None = None
    """Token-type (segment) embeddings; default bert 2, roberta 1, modernbert 0 (none)."""
    pad_token_id: int = 1
    """Padding id. RoBERTa numbers positions from pad_token_id + 1 and gives padding position
    pad_token_id, so it must match the tokenizer's pad id there; other families ignore it."""
    dropout: float | None = None
    """Dropout on embeddings, attention probabilities and residual branches; default bert/roberta 0.1,
    modernbert 0."""
    rope_theta: float = 160_000.0
    """modernbert: RoPE base of global-attention layers."""
    rope_local_theta: float = 10_000.0
    """modernbert: RoPE base of local-attention layers."""
    local_window: int | None = 128
    """modernbert: a local layer sees local_window / 2 tokens on each side (None = every layer global)."""
    global_every: int = 3
    """modernbert: layers 0, n, 2n, ... use global attention; the others are local."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    head: Literal["mlm", "classify", "tag"] | None = None
    """What the encoder ends in: the masked-LM head (unset or mlm), a label per text (classify: the
    first token, [CLS] / <s>, through the family's classification head) or a label per token (tag).
    Set by `slmforge finetune` with finetune.task = "classify" / "tag", or read from an imported
    *ForSequenceClassification / *ForTokenClassification."""
    labels: list[str] | None = None
    """classify / tag: the label names in id order (id2label); at least two."""
    pooling: Literal["cls", "mean"] | None = None
    """classify, modernbert: what the head sees, the first token (cls, the default) or the mean of the
    real tokens (ModernBERT's classifier_pooling = "mean"); BERT and RoBERTa heads read the first token."""

    def __post_init__(self) -> None:
        for name, value in _FAMILY_DEFAULTS.get(self.family, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0, "num_heads",
                f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}")
        require(self.family != "modernbert" or self.head_dim % 2 == 0, "num_heads",
                f"hidden_size / num_heads must be even for RoPE, got {self.head_dim}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.type_vocab_size >= 0, "type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        require(self.local_window is None or self.local_window >= 2, "local_window",
                f"must be at least 2 or unset, got {self.local_window}")
        require(self.global_every >= 1, "global_every", f"must be >= 1, got {self.global_every}")
        require(self.pad_token_id >= 0, "pad_token_id", f"must be >= 0, got {self.pad_token_id}")
        if self.has_classifier:
            labels = self.labels or []
            require(len(labels) >= 2, "labels", f"a {self.head} head needs at least two labels, got {labels}")
            require(len(set(labels)) == len(labels), "labels", f"must be distinct, got {labels}")
            require(all(isinstance(x, str) and x for x in labels), "labels", "must be non-empty names")
        else:
            require(self.labels is None, "labels", "only with head = \"classify\" or \"tag\"")
        require(self.pooling is None or self.head == "classify", "pooling", "only with head = \"classify\"")
        require(self.pooling != "mean" or self.family == "modernbert", "pooling",
                f"mean pooling is ModernBERT's; {self.family} classification heads read the first token")

    # ------------------------------------------------------------ layout switches

    @property
    def has_classifier(self) -> bool:
        """A classification head (classify / tag) instead of the masked-LM head."""
        return self.head in ("classify", "tag")

    @property
    def num_labels(self) -> int:
        return len(self.labels or [])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def pre_norm(self) -> bool:
        return self.family == "modernbert"

    @property
    def rotary(self) -> bool:
        return self.family == "modernbert"

    @property
    def biases(self) -> bool:
        """Linear layers and LayerNorms carry biases (BERT, RoBERTa); ModernBERT has none."""
        return self.family != "modernbert"

    @property
    def gated_mlp(self) -> bool:
        """ModernBERT's blocks use a gated GELU MLP without biases; BERT's and RoBERTa's a plain one."""
        return self.family == "modernbert"

    @property
    def positions_after_pad(self) -> bool:
        """RoBERTa (fairseq) numbers real tokens from pad_token_id + 1, padding keeps pad_token_id."""
        return self.family == "roberta"

    @property
    def norm_head(self) -> bool:
        """Heads transform with dense + GELU + LayerNorm (ModernBERT's prediction head) before the output."""
        return self.family == "modernbert"

    @property
    def position_rows(self) -> int:
        """Learned position embeddings: RoBERTa's table starts at pad_token_id + 1."""
        if self.rotary:
            return 0
        return self.max_seq_len + (self.pad_token_id + 1 if self.positions_after_pad else 0)

    def is_sliding(self, layer: int) -> bool:
        """ModernBERT: layer i is global iff i % global_every == 0 (layers 0, 3, 6, ... for 3)."""
        return self.family == "modernbert" and self.local_window is not None and layer % self.global_every != 0

    def num_parameters(self, include_embeddings: bool = True) -> int:
        from slmforge.models.registry import count_parameters

        return count_parameters(self, include_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N plus bidirectional attention (the whole square, or the window)."""
        n = self.num_parameters(include_embeddings=False) + self.vocab_size * self.hidden_size
        attn = 0.0
        for layer in range(self.num_layers):
            span = min(seq_len, self.local_window + 1) if self.is_sliding(layer) else seq_len
            attn += 12 * self.hidden_size * span
        return 6 * n + attn
