"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention, gated MLP, KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.models.config import ModelConfig


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


def rope_inverse_frequencies(cfg: ModelConfig, theta: float, scaled: bool) -> torch.Tensor:
    """Per-pair rotation speeds 1 / theta^(2i/d), optionally rescaled for longer contexts."""
    dim = cfg.head_dim
    # float32 exactly as transformers and the reference Llama/Gemma code compute it: a float64 table
    # differs by ~1 ulp, which at position 8k already moves logits by ~4e-3 against those checkpoints.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaled or cfg.rope_scaling == "none":
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
    """cos/sin tables of shape (T, head_dim) for the given positions, computed in float32."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd): the "rotate half" layout of HF models
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hd) by position; pairs are (i, i + hd/2) as in Llama/Gemma checkpoints."""
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------- attention


class KVCache:
    """Preallocated keys/values for every layer, shape (B, kv_heads, max_len, head_dim) each.

    `position` counts tokens already stored; the decoder advances it after a forward pass.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.position = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.position, self.position + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        prefix = cache is not None and cache.position > 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd) with S = position + T
        # Fused SDPA: flash / memory-efficient kernels on GPU, never a materialised score matrix for
        # full attention (is_causal). Sliding-window layers pass a boolean (T, S) mask instead.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and not prefix,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def attention_mask(q_len: int, start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (T, S) mask for queries at positions start..start+T over keys 0..start+T.

    True = may attend. Returns None when plain causal attention (SDPA's is_causal) is exact:
    no window and no cached prefix, or a single new token with no window.
    """
    total = start + q_len
    if window is None and (start == 0 or q_len == 1):
        return None
    if window is not None and total <= window and (start == 0 or q_len == 1):
        return None  # the window covers everything visible
    query_pos = torch.arange(start, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= query_pos - key_pos < window  # the token itself counts towards the window
    return mask


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with tanh-approximated gelu."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))
