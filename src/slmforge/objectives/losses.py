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
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows, grad_enabled):
        # hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) with IGNORE_INDEX for positions
        # without a loss. Returns the mean loss and the number of targets that are the argmax.
        # needs_input_grad is True for a Parameter even under no_grad(), so evaluation passes
        # grad_enabled=False to skip forming gradients nobody will read.
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        need_bias_grad = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 for softmax and sums
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight_grad else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias_grad else None
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            ok = valid[start:start + chunk_rows]
            logits = h @ weight.t()  # (n, V)
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            logits = logits.to(acc)
            cap_slope = None
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
                if need_hidden_grad or need_weight_grad or need_bias_grad:  # d(cap tanh(z/cap))/dz = 1 - tanh^2
                    cap_slope = 1.0 - (logits / softcap) ** 2
            safe_t = torch.where(ok, t, 0)
            target_logit = logits.gather(1, safe_t[:, None])[:, 0]
            # One exp pass, in place: the buffer of logits becomes the softmax, which is the gradient
            # (minus the one-hot target) that backward needs.
            row_max = logits.amax(dim=-1, keepdim=True)
            correct += ((target_logit >= row_max[:, 0]) & ok).sum()  # the target is (one of) the argmax
            grad = logits.sub_(row_max).exp_()
            row_sum = grad.sum(dim=-1, keepdim=True)
            log_norm = (row_max + row_sum.log())[:, 0]
            total += torch.where(ok, log_norm - target_logit, 0.0).sum()
            if need_hidden_grad or need_weight_grad or need_bias_grad:
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
                if need_bias_grad:
                    grad_bias += grad.sum(0, dtype=acc)
        denominator = count.clamp(min=1).to(acc)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None), denominator)
        ctx.has = (need_hidden_grad, need_weight_grad, need_bias_grad)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        return total / denominator, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = list(ctx.saved_tensors)
        denominator = saved.pop()
        scale = grad_loss / denominator
        grads = [(saved.pop(0) * scale).to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, chunk_rows: int | None = None,
                         bias: torch.Tensor | None = None, with_correct: bool = False):
    """Mean cross-entropy of softmax(hidden @ weight.T + bias) against targets, ignoring IGNORE_INDEX.

    hidden (..., d), targets (...). Equal in value and gradient to
    F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100). With `with_correct`,
    also returns how many targets are the argmax (accuracy at no extra pass over the vocabulary).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss, correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk_rows,
                                              torch.is_grad_enabled())
    return (loss, correct) if with_correct else loss


def projection_cross_entropy(projection, targets: torch.Tensor, with_correct: bool = False):
    """`linear_cross_entropy` of a model's `OutputProjection` (features, weight, bias, softcap)."""
    return linear_cross_entropy(projection.features, projection.weight, targets, softcap=projection.softcap,
                                bias=projection.bias, with_correct=with_correct)


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain version, for tests and for models whose logits are already at hand."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
