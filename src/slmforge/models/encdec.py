"""Encoder-decoder transformers (T5 v1.1, and seed 002's modern blocks): a bidirectional encoder, a
causal decoder with cross-attention over the encoder's output, one shared embedding.

Plain PyTorch; knows nothing of devices, ranks, files or losses. The two layouts differ only where the
config's switches say so (see `encdec_config.py`): T5's relative position bias and unscaled attention,
or RoPE with grouped-query heads.

    encode(input_ids, attention_mask)                      -> encoder states (B, S, d), once per source
    decode(decoder_input_ids, encoder_hidden, ...)         -> decoder states (B, T, d); with a cache,
                                                              only the new tokens go in
    forward(input_ids, ..., decoder_input_ids=...)         -> decode(encode(...)) for training
    output_projection(hidden) / logits(hidden)             -> the head, as the decoder family has it
    layers                                                 -> encoder blocks, then decoder blocks: what
                                                              FSDP2 shards and activation checkpointing
                                                              recomputes one by one
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.models.encdec_config import EncDecConfig
from slmforge.models.heads import OutputProjection
from slmforge.models.layers import (
    Attention,
    Float32Buffers,
    GatedMLP,
    RMSNorm,
    bidirectional_mask,
    causal_mask,
    rope_cos_sin,
    rope_inverse_frequencies,
)

# Additive mask value for T5's float masks: bfloat16's lowest finite number, finite in float32 and
# bfloat16 alike, so a row whose keys are all masked averages them instead of turning into NaN.
MASKED = torch.finfo(torch.bfloat16).min


def relative_position_bucket(offset: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position) offset (Raffel et al. 2020, section 2.1).

    Bidirectional: half the buckets for keys after the query, half for keys before it. Within a half,
    the first half of its buckets hold exact offsets 0, 1, 2, ...; the rest are log-spaced up to
    max_distance, and farther offsets share the last one. Causal: only keys at or before the query."""
    if bidirectional:
        num_buckets //= 2
        bucket = (offset > 0).long() * num_buckets
        distance = offset.abs()
    else:
        bucket = torch.zeros_like(offset)
        distance = (-offset).clamp(min=0)
    exact = num_buckets // 2
    # float32 log as Mesh TensorFlow and transformers compute it; distance 0 gives -inf here, but
    # `where` takes the exact bucket for it.
    scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    far = (exact + scaled.to(torch.long)).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's self-attention keys/values, preallocated
    (B, kv_heads, max_len, head_dim) per layer, and each layer's cross-attention keys/values of the
    encoder output, computed at the first step and reused after.

    `position` counts decoder tokens already stored; `decode` advances it. Duck-types the `update`
    interface `layers.Attention` calls, so the decoder's self-attention is the shared module."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.max_len = max_len
        self.position = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.position, self.position + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"decoder cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep self-attention rows `rows` (B,) (beam search: the beams that survive). Cross-attention
        entries are left alone: beams only move within their source sentence, whose rows are equal."""
        end = self.position
        for cache in (*self.keys, *self.values):
            cache[:, :, :end] = cache[rows, :, :end]


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output (grouped-query heads
    allowed, no positions). With a cache, the keys and values are projected once per source."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, layer: int,
                 scale: float, dropout: float = 0.0):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dropout = scale, dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
                cache: Seq2SeqCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        stored = cache.cross[self.layer] if cache is not None else None
        if stored is None:
            S = memory.shape[1]
            k = self.k_proj(memory).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
            v = self.v_proj(memory).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if cache is not None:
                cache.cross[self.layer] = (k, v)
        else:
            k, v = stored
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class EncDecBlock(nn.Module):
    """Pre-norm block: self-attention, then (decoder blocks) cross-attention over the encoder output,
    then the gated MLP; each branch is added to the residual stream (after dropout, if any)."""

    def __init__(self, cfg: EncDecConfig, layer: int, decoder: bool):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)  # noqa: E731  (T5: no mean, no bias)
        heads = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.attn_norm = norm()
        self.attn = Attention(*heads, layer=layer, scale=cfg.attention_scale, dropout=cfg.dropout, causal=decoder)
        self.cross_norm = norm() if decoder else None
        self.cross_attn = (CrossAttention(*heads, layer=layer, scale=cfg.attention_scale, dropout=cfg.dropout)
                           if decoder else None)
        self.mlp_norm = norm()
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask, cache=None, memory=None, memory_mask=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory, memory_mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The blocks of one side, its final norm and (T5) its relative position bias table, which the
    first layer computes and every layer of the side shares."""

    def __init__(self, cfg: EncDecConfig, decoder: bool):
        super().__init__()
        count = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.layers = nn.ModuleList(EncDecBlock(cfg, i, decoder) for i in range(count))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads) if cfg.relative_bias else None


class EncoderDecoder(Float32Buffers, nn.Module):
    float32_buffers = ("inv_freq",)

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # shared by encoder and decoder
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        # Tied: the head reads self.embed.weight (no shared Parameter: see Decoder).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2 if cfg.rotary else 0), persistent=False)

    @property
    def layers(self) -> list[nn.Module]:
        """Every block, encoder first: the units train/parallel.py shards (FSDP2) and recomputes
        (activation checkpointing). A plain list, so state-dict names stay encoder./decoder."""
        return [*self.encoder.layers, *self.decoder.layers]

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.cfg.rotary:
            self.inv_freq.copy_(rope_inverse_frequencies(self.cfg, self.cfg.rope_theta, scaled=False))

    def _init_std(self, name: str) -> float:
        cfg = self.cfg
        d, inner = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        if cfg.family == "t5":
            # Mesh TensorFlow's T5 scheme (as transformers' T5 initialises too): unit-variance
            # embeddings, fan-in scaling, and the query additionally by 1/sqrt(head_dim), which is
            # where T5 puts the attention scaling it leaves out of the scores.
            if name == "embed.weight":
                return 1.0
            if name.endswith("q_proj.weight"):
                return (d * cfg.head_dim) ** -0.5
            if name.endswith("o_proj.weight"):
                return inner ** -0.5
            if name.endswith("down_proj.weight"):
                return cfg.intermediate_size ** -0.5
            return d ** -0.5  # k, v, gate, up, relative bias; the untied head: logits of unit scale
        if name.endswith(("o_proj.weight", "down_proj.weight")):  # residual outputs (GPT-2)
            return cfg.init_std / math.sqrt(2 * (cfg.num_layers + cfg.num_decoder_layers))
        return cfg.init_std

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded normal init (per layout, see _init_std); unit RMSNorm scales."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, self._init_std(name),
                                                                           generator=generator)
            param.copy_(values)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
        self.reset_buffers()

    # ------------------------------------------------------------ masks and positions

    def _score_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype attention scores (and so a float mask) will have: autocast's, else x's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _relative_bias(self, stack: Stack, q_len: int, k_len: int, start: int, bidirectional: bool,
                       device: torch.device) -> torch.Tensor:
        """(1, heads, T, S): the bias of queries start..start+T over keys 0..S."""
        query = torch.arange(start, start + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, bidirectional, self.cfg.relative_buckets,
                                           self.cfg.relative_max_distance)
        return stack.relative_bias(buckets).permute(2, 0, 1)[None]  # (T, S, nh) -> (1, nh, T, S)

    @staticmethod
    def _memory_mask(encoder_mask: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
        """Cross-attention mask over the encoder's keys, (B, 1, 1, S): boolean, or additive (dtype)."""
        if encoder_mask is None:
            return None
        allowed = encoder_mask.bool()[:, None, None, :]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, MASKED)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(ids))

    def _finish(self, stack: Stack, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(stack.norm(x))

    # ------------------------------------------------------------ forward

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, hidden) for source ids (B, S); attention_mask (B, S): 1 = token."""
        cfg = self.cfg
        B, S = input_ids.shape
        if S > cfg.max_seq_len:
            raise ValueError(f"source of {S} tokens exceeds max_seq_len {cfg.max_seq_len}")
        x = self._embed(input_ids)
        device = input_ids.device
        cos = sin = None
        if cfg.relative_bias:
            mask = self._relative_bias(self.encoder, S, S, 0, True, device).to(self._score_dtype(x))
            if attention_mask is not None:  # padding keys are masked; T5 masks keys only
                mask = mask.masked_fill(~attention_mask.bool()[:, None, None, :], MASKED)  # (B, nh, S, S)
        else:
            cos, sin = rope_cos_sin(self.inv_freq, torch.arange(S, device=device), x.dtype)
            mask = bidirectional_mask(S, None, device, attention_mask.bool() if attention_mask is not None else None)
        for block in self.encoder.layers:
            x = block(x, cos, sin, mask)
        return self._finish(self.encoder, x)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Decoder states (B, T, hidden) for decoder ids (B, T) over `encoder_hidden` (B, S, hidden).

        `encoder_mask` (B, S) marks the source's real tokens; `attention_mask` (B, start + T) the
        decoder's (cached + new, as in the decoder family). With `cache`, ids are the new tokens only."""
        cfg = self.cfg
        B, T = decoder_input_ids.shape
        start = cache.position if cache is not None else 0
        if start + T > cfg.max_seq_len:
            raise ValueError(f"decoder sequence of {start + T} tokens exceeds max_seq_len {cfg.max_seq_len}")
        x = self._embed(decoder_input_ids)
        device = decoder_input_ids.device
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(B, start + T)} (cached + new tokens)")
            padding = attention_mask.bool()
        cos = sin = None
        if cfg.relative_bias:
            dtype = self._score_dtype(x)
            mask = self._relative_bias(self.decoder, T, start + T, start, False, device).to(dtype)
            allowed = causal_mask(T, start, None, device, padding)
            if allowed is None:  # the whole causal triangle (or one new token, which sees everything)
                allowed = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
            mask = mask.masked_fill(~allowed, MASKED)
            memory_mask = self._memory_mask(encoder_mask, dtype)
        else:
            if padding is None:
                positions = torch.arange(start, start + T, device=device)
            else:  # positions count real tokens, as in the decoder family
                positions = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
            mask = causal_mask(T, start, None, device, padding)
            memory_mask = self._memory_mask(encoder_mask, None)
        for block in self.decoder.layers:
            x = block(x, cos, sin, mask, cache, encoder_hidden, memory_mask)
        if cache is not None:
            cache.position += T
        return self._finish(self.decoder, x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Seq2SeqCache | None = None, *, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states (B, T, hidden): the source `input_ids` (B, S) is encoded (unless its
        `encoder_hidden` is given) and `decoder_input_ids` (B, T) decoded over it."""
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder needs decoder_input_ids (e.g. model.shift_right(targets)); "
                             "encode() runs the encoder alone")
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache)

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: the start token, then the targets but the last, with
        ignored targets (-100) read as the start token (T5 uses its pad id, which is the start id)."""
        start = torch.full_like(targets[:, :1], self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, targets[:, :-1]], dim=1)
        return shifted.masked_fill(shifted < 0, self.cfg.decoder_start_token_id)

    def output_projection(self, hidden: torch.Tensor) -> OutputProjection:
        """The head as a value: decoder states (scaled by d^-0.5 in tied T5) times the output matrix."""
        scale = self.cfg.output_scale
        features = hidden * scale if scale is not None else hidden
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return OutputProjection(features, weight, None, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_projection(hidden).logits()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Seq2SeqCache:
        cfg = self.cfg
        param = self.embed.weight
        return Seq2SeqCache(cfg.num_decoder_layers, cfg.num_kv_heads, cfg.head_dim, batch_size,
                            max_len or cfg.max_seq_len, param.device, param.dtype)
