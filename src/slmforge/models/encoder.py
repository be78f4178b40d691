"""Bidirectional encoders (BERT, RoBERTa / XLM-R, ModernBERT) with the BERT masked-LM head, or with a
classification head (a label per text or per token) once fine-tuned for a task.

Plain PyTorch; knows nothing of devices, ranks, files or losses. The layouts differ only where the
config's switches say so (see `encoder_config.py`): post-norm with learned positions and biases, or
pre-norm with RoPE, GeGLU and local/global attention.
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.errors import SlmforgeError
from slmforge.models.encoder_config import EncoderConfig
from slmforge.models.heads import ClassifierHead, OutputProjection
from slmforge.models.layers import (
    MLP,
    Attention,
    Float32Buffers,
    GatedMLP,
    activation_fn,
    bidirectional_mask,
    rope_cos_sin,
    rope_inverse_frequencies,
)


def _layer_norm(cfg: EncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.biases)


class EncoderBlock(nn.Module):
    """Post-norm (BERT: x = norm(x + f(x))) or pre-norm (ModernBERT: x = x + f(norm(x))) block.

    ModernBERT's first layer has no attention norm: the embeddings were just normalised."""

    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.sliding = cfg.is_sliding(layer)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, layer=layer,
                              scale=cfg.head_dim ** -0.5, dropout=cfg.dropout, bias=cfg.biases, causal=False)
        self.attn_norm = None if (cfg.pre_norm and layer == 0) else _layer_norm(cfg)
        if cfg.gated_mlp:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "gelu", bias=False)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, "gelu", bias=True)
        self.mlp_norm = _layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask):
        if self.pre_norm:
            h = x if self.attn_norm is None else self.attn_norm(x)
            x = x + self.dropout(self.attn(h, cos, sin, mask))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, cos, sin, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm; the vocabulary product (tied embeddings + bias) is left to the loss."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.biases)
        self.norm = _layer_norm(cfg)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))
        self.act = activation_fn("gelu")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class Encoder(Float32Buffers, nn.Module):
    float32_buffers = ("inv_freq_global", "inv_freq_local")

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.position_rows, cfg.hidden_size) if cfg.position_rows else None
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.embed_norm = _layer_norm(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = _layer_norm(cfg) if cfg.pre_norm else None
        if cfg.has_classifier:
            transform = "gelu_norm" if cfg.norm_head else "tanh" if cfg.head == "classify" else None
            pooling = (cfg.pooling or "cls") if cfg.head == "classify" else None
            self.classifier = ClassifierHead(cfg.hidden_size, cfg.num_labels, transform=transform, bias=cfg.biases,
                                             norm_eps=cfg.norm_eps, dropout=cfg.dropout, pooling=pooling)
        else:
            self.head = MaskedLMHead(cfg)
        rope_dim = cfg.head_dim // 2 if cfg.rotary else 0
        self.register_buffer("inv_freq_global", torch.empty(rope_dim), persistent=False)
        self.register_buffer("inv_freq_local", torch.empty(rope_dim), persistent=False)

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.cfg.rotary:
            self.inv_freq_global.copy_(rope_inverse_frequencies(self.cfg, self.cfg.rope_theta, scaled=False))
            self.inv_freq_local.copy_(rope_inverse_frequencies(self.cfg, self.cfg.rope_local_theta, scaled=False))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded N(0, std) for matrices and embeddings (BERT's scheme); zero biases; unit LayerNorms."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                values = torch.empty(module.weight.shape).normal_(0.0, self.cfg.init_std, generator=generator)
                module.weight.copy_(values)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        if not self.cfg.has_classifier:
            self.head.bias.zero_()
        self.reset_buffers()

    # ------------------------------------------------------------ forward

    def _positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if self.cfg.positions_after_pad:
            # fairseq / transformers: real tokens count from pad + 1, padding sits at pad itself.
            real = input_ids.ne(self.cfg.pad_token_id).long()
            return real.cumsum(-1) * real + self.cfg.pad_token_id  # (B, T)
        return torch.arange(T, device=input_ids.device)  # (T,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, hidden) for token ids (B, T); attention_mask (B, T): 1 = token."""
        if cache is not None:
            raise ValueError("an encoder attends in both directions and has no KV cache")
        cfg = self.cfg
        B, T = input_ids.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {cfg.max_seq_len}")
        x = self.embed(input_ids)
        positions = self._positions(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = self.embed_dropout(self.embed_norm(x))
        padding = attention_mask.bool() if attention_mask is not None else None
        tables = {False: (None, None), True: (None, None)}
        if cfg.rotary:
            tables = {False: rope_cos_sin(self.inv_freq_global, positions, x.dtype),
                      True: rope_cos_sin(self.inv_freq_local, positions, x.dtype)}
        half_window = cfg.local_window // 2 if cfg.local_window else None
        masks = {False: bidirectional_mask(T, None, input_ids.device, padding)}
        if any(block.sliding for block in self.layers):
            masks[True] = bidirectional_mask(T, half_window, input_ids.device, padding)
        for block in self.layers:
            cos, sin = tables[block.sliding]
            x = block(x, cos, sin, masks[block.sliding])
        return self.final_norm(x) if self.final_norm is not None else x

    def output_projection(self, hidden: torch.Tensor) -> OutputProjection:
        """The MLM head as a value: transformed hidden states times the tied embeddings, plus a bias.
        Call it on the masked positions only: the transform and the vocabulary product are per token."""
        if self.cfg.has_classifier:
            raise SlmforgeError(f"this {self.cfg.family} encoder was fine-tuned with a {self.cfg.head} head "
                                f"({self.cfg.num_labels} labels), not the masked-LM head; use `slmforge classify`, "
                                f"or `slmforge eval RUN --examples FILE`")
        return OutputProjection(self.head(hidden), self.embed.weight, self.head.bias, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_projection(hidden).logits()

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Label logits from the final hidden states: (B, labels) for a classify head (the first token,
        or the mean of the real ones), (B, T, labels) for a tag head."""
        if not self.cfg.has_classifier:
            raise SlmforgeError(f"this {self.cfg.family} encoder has the masked-LM head, no classification head; "
                                f"fine-tune it with finetune.task = \"classify\" or \"tag\"")
        return self.classifier(hidden, attention_mask)
