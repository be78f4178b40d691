"""The decoder-only transformer. Plain PyTorch; knows nothing of devices, ranks, files or losses."""

from __future__ import annotations

import math

import torch
from torch import nn

from slmforge.models.decoder_config import DecoderConfig
from slmforge.models.documents import document_causal_mask, document_positions
from slmforge.models.flex import block_masks
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
    """Pre-norm block; with `sandwich_norm` the branch outputs are normalised too (Gemma 3). A NoPE layer
    (`cfg.uses_rope(layer)` false) ignores the RoPE tables it is given."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.sliding = cfg.is_sliding(layer)
        self.rope = cfg.uses_rope(layer)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer=layer,
            scale=cfg.attention_scale, dropout=cfg.dropout, causal=True, bias=cfg.qkv_bias, out_bias=cfg.out_bias,
            qk_norm=(lambda: RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)) if cfg.qk_norm else None)
        self.mlp_norm = norm()
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.attn_out_norm = norm() if cfg.sandwich_norm else None
        self.mlp_out_norm = norm() if cfg.sandwich_norm else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x, cos, sin, mask, cache):
        if not self.rope:
            cos = sin = None
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
        self.attention = "sdpa"  # the kernel of passes without a cache: see set_attention
        self.block_masks = block_masks

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute RoPE frequencies (needed after building on the meta device)."""
        cfg = self.cfg
        self.inv_freq_global.copy_(rope_inverse_frequencies(cfg, cfg.rope_theta, scaled=True))
        local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        # Gemma 3 applies rope scaling to global layers only; local layers keep plain RoPE.
        self.inv_freq_local.copy_(rope_inverse_frequencies(cfg, local_theta, scaled=cfg.scales_local_rope))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded N(0, std) init; residual output projections scaled by 1/sqrt(2L) (GPT-2); biases 0."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith(".bias"):
                param.zero_()
                continue
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, s, generator=generator)
            param.copy_(values)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
        self.reset_buffers()

    # ------------------------------------------------------------ forward

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, hidden), scaled where the family scales them."""
        x = self.embed(input_ids)
        if self.cfg.embed_scale:
            # Gemma multiplies by sqrt(d) rounded to the activation dtype (transformers' normalizer).
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        return x

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
        x = self.embed_tokens(input_ids)
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
        flex = cache is None and self.attention == "flex"
        masks = (self.block_masks(T, device, cfg.sliding_window if self.has_local_layers else None, key_padding=padding)
                 if flex else {False: causal_mask(T, start, None, device, padding)})
        if self.has_local_layers:
            tables[True] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
            if cache is not None and cache.window is not None:  # ring caches: keys in slot order
                masks[True] = window_mask(T, start, cache.window_key_positions(T, device), cache.window, padding)
            elif not flex:
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
        x = self.embed_tokens(input_ids)
        positions = document_positions(document_ids)
        tables = {False: rope_cos_sin(self.inv_freq_global, positions, x.dtype)}
        window = self.cfg.sliding_window if self.has_local_layers else None
        if self.attention == "flex":
            masks = self.block_masks(input_ids.shape[1], input_ids.device, window, document_ids=document_ids)
        else:
            masks = {False: document_causal_mask(document_ids)}
            if window is not None:
                masks[True] = document_causal_mask(document_ids, window)
        if self.has_local_layers:
            tables[True] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
        for block in self.layers:
            cos, sin = tables[block.sliding]
            x = block(x, cos, sin, masks[block.sliding], None)
        return self.norm(x)

    def set_attention(self, kernel: str) -> None:
        """The attention kernel of passes without a cache (training, evaluation). "sdpa": sliding
        windows, packed documents and padding reach SDPA as a boolean (T, T) mask, which also rules
        out its flash kernel. "flex": they reach FlexAttention as a block mask made from the same rule
        (models/flex.py), one per layer kind and pass, so fully masked tiles are skipped and no (T, T)
        mask is needed. Full causal layers keep SDPA's is_causal and decoding with a cache keeps SDPA
        either way; both kernels compute the same function (tests/test_flex_attention.py).

        Set by the training loop (`train.attention`), not by DecoderConfig: the choice changes how the
        model runs, not what it is, so checkpoints, resuming and Hugging Face export do not carry it."""
        if kernel not in ("sdpa", "flex"):
            raise ValueError(f"attention kernel must be sdpa or flex, got {kernel!r}")
        if kernel == "flex" and self.cfg.dropout > 0:
            raise ValueError(f"FlexAttention has no attention dropout and this model has dropout {self.cfg.dropout}")
        self.attention = kernel
        if kernel == "flex":
            # Block masks are built outside any graph torch.compile traces (train.compile = "model"),
            # by their own compiled builder, and enter the model's graph as inputs, as with per-block
            # compiling: built inside it, inductor found no CPU kernel for flex_attention (torch 2.13).
            # Wrapped here rather than at import: torch.compiler.disable imports dynamo (~1 s).
            self.block_masks = torch.compiler.disable(block_masks)

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

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache, position: torch.Tensor,
                    key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, 1, hidden) for one new token per row (B, 1) at `position`, a
        0-dim long tensor (the tokens already in `cache`), with every shape fixed for the whole
        generation: each layer attends to its whole buffer (max_len keys, or the ring's window) through
        a mask computed from `position`, and writes its keys/values in place (`KVCache.at`). This is the
        step `generate` compiles (issue 17); `forward` with the cache stays the prefill. The same states
        as `forward(input_ids, cache=cache)` at that position; `cache.position` is left to the caller.

        `key_padding` (B, max_len), 1 = token, is `attention_mask` laid over the whole buffer (what lies
        beyond `position` is ignored)."""
        x = self.embed_tokens(input_ids)
        if key_padding is None:
            positions = position.reshape(1)  # (1,)
        else:  # the real tokens up to this one, as forward counts them: (B, 1)
            upto = torch.arange(cache.max_len, device=position.device) <= position
            positions = ((key_padding.bool() & upto).sum(-1, keepdim=True) - 1).clamp(min=0)
        tables = {False: rope_cos_sin(self.inv_freq_global, positions, x.dtype)}
        masks = {False: cache.step_mask(False, position, None, key_padding)}
        if self.has_local_layers:
            ring = cache.window is not None  # sliding layers have rings, or full buffers and a window mask
            tables[True] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
            masks[True] = cache.step_mask(ring, position, None if ring else self.cfg.sliding_window, key_padding)
        step = cache.at(position)
        for block in self.layers:
            cos, sin = tables[block.sliding]
            x = block(x, cos, sin, masks[block.sliding], step)
        return self.norm(x)
