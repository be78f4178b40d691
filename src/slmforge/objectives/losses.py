"""Cross-entropy over the vocabulary without materialising (tokens x vocab) logits at once.

With Gemma's 262k vocabulary, full logits for 48 x 1024 tokens take 50 GB in fp32. Here the output
projection and the loss are computed chunk by chunk; the gradients of each chunk are formed right
away (the softmax minus the one-hot target), so neither forward nor backward ever holds more than
one chunk of logits. This is the "fused linear cross-entropy" idea of Liger-Kernel / Apple's CCE,
written in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows, grad_enabled):
        # hidden (N, d), weight (V, d), targets (N,) with IGNORE_INDEX for positions without a loss.
        # needs_input_grad is True for a Parameter even under no_grad(), so evaluation passes
        # grad_enabled=False to skip forming gradients nobody will read.
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 for softmax and sums
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            ok = valid[start:start + chunk_rows]
            logits = (h @ weight.t()).to(acc)  # (n, V)
            cap_slope = None
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
                if need_hidden_grad or need_weight_grad:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                    cap_slope = 1.0 - (logits / softcap) ** 2
            safe_t = torch.where(ok, t, 0)
            target_logit = logits.gather(1, safe_t[:, None])[:, 0]
            # One exp pass, in place: the buffer of logits becomes the softmax, which is the gradient
            # (minus the one-hot target) that backward needs.
            row_max = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(row_max).exp_()
            row_sum = grad.sum(dim=-1, keepdim=True)
            log_norm = (row_max + row_sum.log())[:, 0]
            total += torch.where(ok, log_norm - target_logit, 0.0).sum()
            if need_hidden_grad or need_weight_grad:
                grad.div_(row_sum)
                grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad.mul_(ok[:, None])
                if cap_slope is not None:
                    grad.mul_(cap_slope)
                grad = grad.to(h.dtype)
                if need_hidden_grad:
                    grad_hidden[start:start + chunk_rows] = grad @ weight.to(h.dtype)
                if need_weight_grad:
                    grad_weight += (grad.t() @ h).to(acc)
        denominator = count.clamp(min=1).to(acc)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None), denominator)
        ctx.has = (need_hidden_grad, need_weight_grad)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        denominator = saved.pop()
        scale = grad_loss / denominator
        grad_hidden = (saved.pop(0) * scale).to(ctx.hidden_dtype) if ctx.has[0] else None
        grad_weight = (saved.pop(0) * scale).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets, ignoring IGNORE_INDEX.

    hidden (..., d), targets (...). Equal in value and gradient to
    F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_rows, torch.is_grad_enabled())


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain version, for tests and for models whose logits are already at hand."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
