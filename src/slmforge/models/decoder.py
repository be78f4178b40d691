"""The decoder-only transformer. Plain PyTorch; knows nothing of devices, ranks, files or losses."""

from __future__ import annotations

import math

import torch
from torch import nn

from slmforge.models.decoder_config import DecoderConfig
from slmforge.models.documents import document_causal_mask, document_positions
from slmforge.models.heads import OutputProjection
from slmforge.models.layers import (
    Attention,
    Float32Buffers,
    GatedMLP,
    KVCache,
    RMSNorm,
    causal_mask,
    rope_cos_sin,
    rope_inverse_frequencies,
    window_mask,
)


class Block(nn.Module):
    """Pre-norm block; with `sandwich_norm` the branch outputs are normalised too (Gemma 3)."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.sliding = cfg.is_sliding(layer)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer=layer,
            scale=cfg.attention_scale, dropout=cfg.dropout, causal=True,
            qk_norm=(lambda: RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)) if cfg.qk_norm else None)
        self.mlp_norm = norm()
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.attn_out_norm = norm() if cfg.sandwich_norm else None
        self.mlp_out_norm = norm() if cfg.sandwich_norm else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x, cos, sin, mask, cache):
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        if self.dropout is not None:
            h = self.dropout(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return x + h


class Decoder(Float32Buffers, nn.Module):
    float32_buffers = ("inv_freq_global", "inv_freq_local")

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_unit_offset)
        # Tied weights are used through self.embed.weight rather than a shared Parameter: sharing breaks
        # under to_empty()/FSDP and safetensors refuses aliased tensors.
        self.has_local_layers = any(block.sliding for block in self.layers)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq_global", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_local", torch.empty(cfg.head_dim // 2), persistent=False)

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute RoPE frequencies (needed after building on the meta device)."""
        cfg = self.cfg
        self.inv_freq_global.copy_(rope_inverse_frequencies(cfg, cfg.rope_theta, scaled=True))
        local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        # Gemma 3 applies rope scaling to global layers only; local layers keep plain RoPE.
        self.inv_freq_local.copy_(rope_inverse_frequencies(cfg, local_theta, scaled=cfg.family != "gemma3"))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded N(0, std) init; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, s, generator=generator)
            param.copy_(values)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
        self.reset_buffers()

    # ------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden) for token ids (B, T).

        `attention_mask` (B, S), 1 = token, 0 = padding, covers the cached tokens and the new ones
        (S = cache position + T), as in transformers. Positions count real tokens only, so left- and
        right-padded rows get the same positions as unpadded ones.

        `document_ids` (B, T) packs several documents into a row (training only): positions restart
        and attention stays within each document (see `models/documents.py`).
        """
        if document_ids is not None:
            return self._forward_packed(input_ids, document_ids, cache)
        cfg = self.cfg
        B, T = input_ids.shape
        start = cache.position if cache is not None else 0
        if start + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {cfg.max_seq_len}")
        x = self.embed(input_ids)
        if cfg.embed_scale:
            # Gemma multiplies by sqrt(d) rounded to the activation dtype (transformers' normalizer).
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)
        device = input_ids.device
        if attention_mask is None:
            positions = torch.arange(start, start + T, device=device)  # (T,)
            padding = None
        else:
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(B, start + T)} (cached + new tokens)")
            padding = attention_mask.bool()
            positions = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        tables = {False: rope_cos_sin(self.inv_freq_global, positions, x.dtype)}
        masks = {False: causal_mask(T, start, None, device, padding)}
        if self.has_local_layers:
            tables[True] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
            if cache is not None and cache.window is not None:  # ring caches: keys in slot order
                masks[True] = window_mask(T, start, cache.window_key_positions(T, device), cache.window, padding)
            else:
                masks[True] = causal_mask(T, start, cfg.sliding_window, device, padding)
        for block in self.layers:
            cos, sin = tables[block.sliding]
            x = block(x, cos, sin, masks[block.sliding], cache)
        if cache is not None:
            cache.position += T
        return self.norm(x)

    def _forward_packed(self, input_ids: torch.Tensor, document_ids: torch.Tensor,
                        cache: KVCache | None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("document_ids (packed rows) is for training; decoding with a cache takes one document")
        if document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        if self.cfg.embed_scale:
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        positions = document_positions(document_ids)
        tables = {False: rope_cos_sin(self.inv_freq_global, positions, x.dtype)}
        masks = {False: document_causal_mask(document_ids)}
        if self.has_local_layers:
            tables[True] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
            masks[True] = document_causal_mask(document_ids, self.cfg.sliding_window)
        for block in self.layers:
            cos, sin = tables[block.sliding]
            x = block(x, cos, sin, masks[block.sliding], None)
        return self.norm(x)

    def output_projection(self, hidden: torch.Tensor) -> OutputProjection:
        """The head as a value: final hidden states times the (tied or separate) output matrix."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return OutputProjection(hidden, weight, None, self.cfg.final_logit_softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) for hidden states (..., hidden)."""
        return self.output_projection(hidden).logits()

    def new_cache(self, batch_size: int, max_len: int | None = None, ring: bool = True) -> KVCache:
        """Keys/values for decoding up to `max_len` tokens. With `ring` (the default), sliding-window
        layers keep only their window (a ring buffer) and decoding attends to it alone; ring=False keeps
        every token on every layer (the plain path, kept for checks)."""
        param = self.embed.weight
        cfg = self.cfg
        sliding = [block.sliding for block in self.layers]
        return KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, batch_size, max_len or cfg.max_seq_len,
                       param.device, param.dtype, window=cfg.sliding_window if ring else None, sliding=sliding)
