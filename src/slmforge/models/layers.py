"""Building blocks shared by every family: norms, rotary embeddings, attention, MLPs, masks, KV cache.

Blocks take their sizes as arguments rather than a family's config, so the decoder and the encoders
(BERT, RoBERTa, ModernBERT) assemble the same pieces in their own order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.models.flex import BlockMask, attend


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32.

    `unit_offset=True` is Gemma's variant: the scale is (1 + weight), weight starts at 0, and the
    product is taken in float32 before casting back (transformers' Gemma3RMSNorm does the same; the
    cast order matters in bf16). Llama casts back first and then multiplies by weight.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


# ---------------------------------------------------------------- rotary position embedding


class Float32Buffers:
    """Mixin for models with RoPE frequency buffers: keep them float32 under .to(torch.bfloat16) /
    .half(), as transformers does (rounded to bf16 they rotate position 100 ~0.1 rad off and move
    logits by ~0.1). The model names them in `float32_buffers` and recomputes them in reset_buffers()."""

    float32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        rounded = False
        for name in self.float32_buffers:
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                setattr(self, name, torch.empty(buffer.shape, dtype=torch.float32, device=buffer.device))
                rounded = True
        if rounded:
            self.reset_buffers()
        return self



def rope_inverse_frequencies(cfg, theta: float, scaled: bool) -> torch.Tensor:
    """Per-pair rotation speeds 1 / theta^(2i/d), optionally rescaled for longer contexts.

    `cfg` supplies head_dim and, when `scaled`, the rope_scaling fields (a decoder config)."""
    dim = cfg.head_dim
    # float32 exactly as transformers and the reference Llama/Gemma code compute it: a float64 table
    # differs by ~1 ulp, which at position 8k already moves logits by ~4e-3 against those checkpoints.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaled or getattr(cfg, "rope_scaling", "none") == "none":
        return inv_freq.float()
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return (inv_freq / factor).float()
    # "llama3" (Llama 3.1 report): slow the low frequencies by `factor`, keep the high ones, and
    # interpolate smoothly in between, by wavelength relative to the original context length.
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
    high_wavelength = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
    scaled_freq = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
    smooth = (cfg.rope_original_max_seq_len / wavelength - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, blended, scaled_freq).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions (T,) -> (T, head_dim), or per row (B, T) -> (B, 1, T, head_dim),
    computed in float32; both broadcast against (B, heads, T, head_dim)."""
    angles = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, hd): the "rotate half" layout of HF models
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, hd): one table per row, shared by the heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hd) by position; pairs are (i, i + hd/2) as in Llama/Gemma checkpoints."""
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------- attention



class KVCache:
    """Preallocated keys/values per layer: (B, kv_heads, max_len, head_dim) for full-attention layers.

    With `window` and `sliding` (one flag per layer), each sliding-window layer keeps a ring of the last
    `window` keys/values instead, (B, kv_heads, window, head_dim): position p lives in slot p % window.
    A sliding layer never needs older keys, so its memory stays constant and decoding attends to at
    most `window` keys rather than to the whole context (with a mask) as a full cache would.
    `position` counts tokens already stored; the decoder advances it after a forward pass.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, window: int | None = None,
                 sliding: Sequence[bool] | None = None):
        ring = window is not None and sliding is not None and window < max_len
        self.ring = [bool(ring and sliding[layer]) for layer in range(num_layers)]
        self.window = window if ring else None
        shapes = [(batch_size, num_kv_heads, window if is_ring else max_len, head_dim) for is_ring in self.ring]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.max_len = max_len
        self.position = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, kv_heads, T, hd) and return what the layer attends to: the cached
        prefix and the new tokens, in position order for a full layer; for a ring layer, the keys at
        `window_key_positions(T)` (slot order, which attention does not care about given the mask)."""
        start, end = self.position, self.position + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        if not self.ring[layer]:
            self.keys[layer][:, :, start:end] = k
            self.values[layer][:, :, start:end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        keys, values, window = self.keys[layer], self.values[layer], self.window
        if k.shape[2] == 1:  # decoding: overwrite the oldest slot, attend to the ring
            keys[:, :, start % window] = k[:, :, 0]
            values[:, :, start % window] = v[:, :, 0]
            filled = min(end, window)
            return keys[:, :, :filled], values[:, :, :filled]
        # prefill (or a chunk): the stored window, then every new token; then keep the newest `window`.
        filled = min(start, window)
        out_k = torch.cat([keys[:, :, :filled], k], dim=2) if filled else k
        out_v = torch.cat([values[:, :, :filled], v], dim=2) if filled else v
        keep = min(k.shape[2], window)
        slots = torch.arange(end - keep, end, device=k.device) % window
        keys.index_copy_(2, slots, k[:, :, -keep:])
        values.index_copy_(2, slots, v[:, :, -keep:])
        return out_k, out_v

    def window_key_positions(self, new_tokens: int, device: torch.device) -> torch.Tensor:
        """Positions (S,) of the keys a ring layer's `update` returns for `new_tokens` starting at
        `position`. Slot s holds the newest stored position p with p % window == s."""
        start, window = self.position, self.window
        stored = start + 1 if new_tokens == 1 else start  # decoding writes before it attends
        slots = torch.arange(min(stored, window), device=device)
        newest = stored - 1
        slot_positions = newest - (newest - slots) % window
        if new_tokens == 1:
            return slot_positions
        return torch.cat([slot_positions, torch.arange(start, start + new_tokens, device=device)])

    # Static decoding (issue 17): one token per step with tensor shapes fixed for the whole generation,
    # so that a compiled step (CUDA graphs included) is traced once, not once per position.

    def at(self, position: torch.Tensor) -> "KVCacheStep":
        """The cache as one decoding step at `position` (a 0-dim long tensor) sees it."""
        return KVCacheStep(self, position)

    def step_mask(self, ring: bool, position: torch.Tensor, window: int | None = None,
                  key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Mask (1, 1, 1, S), or (B, 1, 1, S) with `key_padding`, for one new token at `position` over a
        whole layer buffer as `KVCacheStep.update` returns it: S = max_len for a full buffer, `window`
        for a ring. Computed from the tensor, so its shape is the same at every step. `window` limits a
        full buffer to a sliding window (window_cache=false); `key_padding` (B, max_len) is True (1) at
        real tokens, indexed by position, as `attention_mask` is."""
        if ring:  # slot s holds the newest position p <= position with p % window == s (< 0: not yet)
            slots = torch.arange(self.window, device=position.device)
            key_pos = position - (position - slots) % self.window
        else:  # slot s holds position s
            key_pos = torch.arange(self.max_len, device=position.device)
        mask = (key_pos >= 0) & (key_pos <= position)
        if window is not None:
            mask &= position - key_pos < window  # the token itself counts towards the window
        if key_padding is None:
            return mask[None, None, None]
        real = key_padding.bool().gather(1, key_pos.clamp(min=0).expand(key_padding.shape[0], -1))
        # the new token always sees itself (as in _with_padding): a row with no key would give NaN
        return ((mask & real) | (key_pos == position))[:, None, None]


class KVCacheStep:
    """A `KVCache` at a tensor position, for `Decoder.decode_step`: `update` writes one token's keys and
    values in place (index_copy_ at `position`, or at `position % window` in a ring) and returns the
    whole buffers, (B, kv_heads, max_len or window, hd), whose unused slots `KVCache.step_mask` hides.

    Duck-types `KVCache.update` for `Attention`. `position` is a tensor here, not an int: no Python
    value changes from one step to the next, so nothing in the step's graph does."""

    def __init__(self, cache: KVCache, position: torch.Tensor):
        self.cache = cache
        self.position = position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        keys, values = cache.keys[layer], cache.values[layer]
        slot = (self.position % cache.window if cache.ring[layer] else self.position).reshape(1)
        keys.index_copy_(2, slot, k.to(keys.dtype))  # k: (B, kv_heads, 1, hd)
        values.index_copy_(2, slot, v.to(values.dtype))
        return keys, values


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional QK-norm, biases and rotary positions.
    `bias` puts biases on all four projections; `out_bias`, when given, decides o_proj's alone (Qwen2:
    q, k and v only). Positions reach it as cos/sin tables, or as None for a layer without RoPE.

    `causal` decoders use SDPA's is_causal when no mask is needed (no materialised score matrix);
    encoders attend both ways and pass a mask only for padding or local windows. A FlexAttention
    BlockMask in place of a boolean mask (Decoder.set_attention("flex")) runs flex_attention instead.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, layer: int,
                 scale: float, dropout: float = 0.0, bias: bool = False, causal: bool = True,
                 qk_norm: Callable[[], nn.Module] | None = None, out_bias: bool | None = None):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dropout, self.causal = scale, dropout, causal
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if out_bias is None else out_bias)
        self.q_norm = qk_norm() if qk_norm else None
        self.k_norm = qk_norm() if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, BlockMask):  # FlexAttention's block mask (models/flex.py): training, no cache
            y = attend(q, k, v, mask, self.scale)  # (B, nh, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        prefix = cache is not None and cache.position > 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd) with S = position + T
        # Fused SDPA: flash / memory-efficient kernels on GPU, never a materialised score matrix for
        # full causal attention (is_causal). Windows and padding pass a boolean mask instead.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1 and not prefix,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


# ---------------------------------------------------------------- masks (True = may attend)


def causal_mask(q_len: int, start: int, window: int | None, device: torch.device,
                key_padding: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mask for queries at positions start..start+T over keys 0..start+T: (T, S), or (B, 1, T, S) with
    `key_padding` (B, S) (True = a real token).

    Returns None when plain causal attention (SDPA's is_causal) is exact: no padding, no window and no
    cached prefix, or a single new token with no window.
    """
    total = start + q_len
    if key_padding is None:
        if window is None and (start == 0 or q_len == 1):
            return None
        if window is not None and total <= window and (start == 0 or q_len == 1):
            return None  # the window covers everything visible
    query_pos = torch.arange(start, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= query_pos - key_pos < window  # the token itself counts towards the window
    if key_padding is None:
        return mask
    return _with_padding(mask, key_padding, query_pos == key_pos)


def window_mask(q_len: int, start: int, key_positions: torch.Tensor, window: int,
                key_padding: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mask for a ring-cached sliding layer: queries at start..start+T over keys at `key_positions` (S,)
    (see KVCache.window_key_positions): (T, S), or (B, 1, T, S) with `key_padding` (B, start + T).
    None when plain causal attention is exact (single-token decoding, or a first prefill no longer than
    the window, without padding)."""
    if key_padding is None and q_len == 1:
        return None  # the ring holds exactly the window (or fewer tokens): all visible, all in the past
    if key_padding is None and start == 0 and q_len <= window:
        return None  # a first prefill within the window: plain causal attention (SDPA's is_causal)
    query_pos = torch.arange(start, start + q_len, device=key_positions.device)[:, None]
    key_pos = key_positions[None, :]
    mask = (key_pos <= query_pos) & (query_pos - key_pos < window)
    if key_padding is None:
        return mask
    return _with_padding(mask, key_padding[:, key_positions], query_pos == key_pos)


def bidirectional_mask(length: int, window: int | None, device: torch.device,
                       key_padding: torch.Tensor | None = None) -> torch.Tensor | None:
    """Encoder mask: every token sees every real token, or those within `window` on each side.

    Returns None (no mask at all: the fastest kernels) when neither padding nor a window applies."""
    positions = torch.arange(length, device=device)
    mask = None
    if window is not None and window < length - 1:
        mask = (positions[:, None] - positions[None, :]).abs() <= window
    if key_padding is None:
        return mask
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device)
    return _with_padding(mask, key_padding, positions[:, None] == positions[None, :])


def _with_padding(mask: torch.Tensor, key_padding: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """(T, S) & padding (B, S) -> (B, 1, T, S). A padding query may always see itself: a row with no
    allowed key would turn SDPA's softmax into NaN, which would then leak into gradients."""
    full = mask[None, None] & key_padding[:, None, None, :].bool()
    return full | diagonal[None, None]


# ---------------------------------------------------------------- feed-forward


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """silu (SwiGLU), gelu_tanh (GeGLU in Gemma), gelu (exact erf form: BERT, RoBERTa, ModernBERT)."""
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))): the original Transformer / BERT feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
