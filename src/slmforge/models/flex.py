"""FlexAttention for the training path (issue 17): sliding windows, packed documents and padding as
block masks rather than boolean (T, S) masks.

SDPA takes such a rule only as a boolean mask, which it reads in full and which rules out its flash
kernel. FlexAttention takes the rule as a function of (batch, head, query, key), a `mask_mod`, and
`create_block_mask` turns it into a BlockMask: for each 128 x 128 tile, empty (skipped), full (no mask
applied) or partial (the mask_mod is evaluated inside the fused kernel). A window of w over T tokens
then costs about T * w instead of T * T / 2, and (create_block_mask compiled) no (T, T) tensor is made.

Both the block masks and the kernel go through torch.compile, once, on first use: flex_attention
without it is a reference implementation that materialises the score matrix. If compiling fails (no
Triton, no C++ compiler) that is said once, and from then on the same rule reaches SDPA as a boolean
mask: the plain path, slower but the same numbers.

Limits in torch 2.13: no backward pass on CPU or MPS (torch refuses it, so training there keeps SDPA;
`runtime.apply_attention` says so), and no attention dropout.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    flex_attention,
    or_masks,
)

__all__ = ["BlockMask", "attend", "block_masks"]


class CompiledOnce:
    """`fn` through torch.compile, compiled on the first call. If that first call fails and `fallback`
    succeeds on the same arguments (so the arguments were fine and compiling was the problem), says so
    once and calls `fallback` from then on. Inside a region being compiled already (train.compile's
    blocks) `fn` itself is called: dynamo traces it there.

    `eager = True` skips compiling (tests on CPU, where each compile costs seconds)."""

    def __init__(self, fn: Callable, fallback: Callable, what: str, instead: str):
        self.fn, self.fallback, self.what, self.instead = fn, fallback, what, instead
        self.compiled: Callable | None = None
        self.state = "untried"  # -> "compiled" | "failed"
        self.eager = False

    def __call__(self, *args, **kwargs):
        if self.eager or torch.compiler.is_compiling():
            return self.fn(*args, **kwargs)
        if self.state == "failed":
            return self.fallback(*args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        if self.state == "compiled":
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
            _probe_backward(out, args, kwargs)
        except Exception as error:
            out = self.fallback(*args, **kwargs)  # raises if the arguments, not compiling, were the problem
            self.state = "failed"
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            warnings.warn(f"{self.what}: torch.compile failed ({type(error).__name__}: {reason}); "
                          f"{self.instead}", RuntimeWarning, stacklevel=2)
            return out
        self.state = "compiled"
        return out


def _probe_backward(out, args, kwargs) -> None:
    """Build the compiled backward now, inside the first call's fallback check: AOTAutograd compiles it
    lazily, at the first `loss.backward()`, where a failure (e.g. a GPU with less shared memory than
    the kernel wants) would escape the fallback and end the run."""
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        return
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.autograd.grad(out.float().sum(), inputs, retain_graph=True)


def _sdpa_with_block_mask(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                          block_mask: BlockMask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """The fallback: the rule as a boolean mask, through SDPA (the plain path)."""
    batch, _, q_len, kv_len = block_mask.shape
    mask = create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device=query.device)  # (B|1, 1, T, S)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


attention_kernel = CompiledOnce(flex_attention, _sdpa_with_block_mask, "FlexAttention",
                                "attention runs through SDPA with the same rule as a boolean mask (the plain path)")
mask_builder = CompiledOnce(create_block_mask, create_block_mask, "create_block_mask",
                            "block masks are built eagerly, through a temporary (B, T, T) boolean tensor")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
           scale: float) -> torch.Tensor:
    """Attention (B, heads, T, hd) of query (B, heads, T, hd) over key/value (B, kv_heads, S, hd) where
    `block_mask` allows it; grouped-query heads are shared inside the kernel, as SDPA's enable_gqa."""
    return attention_kernel(query, key, value, block_mask=block_mask, scale=scale,
                            enable_gqa=key.shape[1] != query.shape[1])


# ---------------------------------------------------------------- rules (True = may attend)


def _causal(b, h, q, kv):
    return kv <= q


def _rule(window: int | None, document_ids: torch.Tensor | None, key_padding: torch.Tensor | None):
    """The mask_mod of `causal_mask` / `document_causal_mask` (models/layers.py, models/documents.py)."""
    parts = [_causal]
    if window is not None:
        parts.append(lambda b, h, q, kv: q - kv < window)  # the token itself counts towards the window
    if document_ids is not None:
        parts.append(lambda b, h, q, kv: document_ids[b, q] == document_ids[b, kv])
    if key_padding is not None:
        parts.append(lambda b, h, q, kv: key_padding[b, kv])
    rule = and_masks(*parts) if len(parts) > 1 else _causal
    if key_padding is not None:
        # A padding query always sees itself, as in layers._with_padding: a row with no allowed key
        # would make the softmax NaN, which then leaks into gradients.
        rule = or_masks(rule, lambda b, h, q, kv: q == kv)
    return rule


def block_masks(length: int, device: torch.device, window: int | None = None,
                document_ids: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None) -> dict[bool, BlockMask | None]:
    """The mask of each layer kind for a forward pass without a cache, built once and shared by every
    layer of that kind: False = full attention, True = sliding window of `window` tokens (present only
    when `window` is given). None where SDPA's is_causal is exact: no documents, no padding, and for
    sliding layers a window that covers all `length` tokens.

    `document_ids` (B, T): attention stays within each document. `key_padding` (B, T), True (1) at
    real tokens: padding keys are hidden."""
    # The rules capture these tensors contiguous: compiled for CPU (torch 2.13), flex_attention read a
    # strided one (document_ids[:, :-1], as CausalLM.collate slices it) out of bounds and raised.
    batch = None  # one mask broadcast over the batch unless a row-dependent rule asks for one per row
    if document_ids is not None:
        document_ids, batch = document_ids.contiguous(), document_ids.shape[0]
    if key_padding is not None:
        key_padding, batch = key_padding.bool().contiguous(), key_padding.shape[0]

    def build(window: int | None) -> BlockMask:
        return mask_builder(_rule(window, document_ids, key_padding), batch, None, length, length, device=device)

    masks = {False: build(None) if batch is not None else None}
    if window is not None:
        masks[True] = masks[False] if window >= length else build(window)
    return masks
