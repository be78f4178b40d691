"""Cross-entropy over the vocabulary without materialising (tokens x vocab) logits at once.

With Gemma's 262k vocabulary, full logits for 48 x 1024 tokens take 50 GB in fp32. Here the output
projection and the loss are computed chunk by chunk; the gradients of each chunk are formed right
away (the softmax minus the one-hot target), so neither forward nor backward ever holds more than
one chunk of logits. This is the "fused linear cross-entropy" idea of Liger-Kernel / Apple's CCE,
written in plain PyTorch.

An optional z-loss (PaLM, Chowdhery et al. 2022, section 5) adds z_loss * log(Z)^2 per scored row, Z the
softmax normaliser, to keep log Z near 0; its gradient, 2 z_loss log(Z) softmax, joins the same chunk pass.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmforge.errors import SlmforgeError

IGNORE_INDEX = -100
# Rows per chunk when the caller does not say: a chunk's fp32 logits take rows x vocab x 4 bytes. Larger
# chunks mean fewer passes over the (vocab, d) weight and its gradient (each chunk reads the weight twice
# and adds into the full weight gradient once), smaller ones less memory. Measured in issue 17 at
# vocab 262,144: 1,024-2,048 rows beat plain logits + cross-entropy; 128 rows (the old 128 MB budget)
# spent most of the time re-reading the weight. The budget per device kind is the logits' bytes.
CHUNK_BYTES = {"cuda": 2 * 2**30, "cpu": 1 * 2**30}
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 8192


def default_chunk_rows(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk for a vocabulary on a device kind: the fp32 logits of one chunk fill the device's
    budget in CHUNK_BYTES, clamped to [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS] (256-8192 rows)."""
    kind = torch.device(device).type
    rows = CHUNK_BYTES.get(kind, CHUNK_BYTES["cpu"]) // (4 * vocab_size)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when autocast is on for this device (as `h @ W.T` would get), else
    the wider of the two inputs' dtypes."""
    kind = hidden.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows, grad_enabled, z_loss):
        # hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) with IGNORE_INDEX for positions
        # without a loss. Returns the mean loss (cross-entropy + z term), the number of targets that are
        # the argmax, and the z term alone (z_loss * mean log(Z)^2; zero when z_loss is 0).
        # needs_input_grad is True for a Parameter even under no_grad(), so evaluation passes
        # grad_enabled=False to skip forming gradients nobody will read.
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        need_bias_grad = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        need_grad = need_hidden_grad or need_weight_grad or need_bias_grad
        compute = _compute_dtype(hidden, weight)
        acc = torch.promote_types(compute, torch.float32)  # at least fp32 for softmax and sums
        # Cast once per call, then run with autocast off. Under autocast `h @ weight.t()` would cast the
        # whole (V, d) weight again for every chunk: `.t()` is a view, and autocast's cast cache only
        # keeps casts of leaf tensors. The same holds for the backward product with the weight.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)  # (V, d)
            x = hidden.to(compute)  # (N, d)
            b = bias.to(acc) if bias is not None else None
            valid = targets != IGNORE_INDEX
            count = valid.sum()
            total = torch.zeros((), dtype=acc, device=hidden.device)
            log_norm_squares = torch.zeros((), dtype=acc, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            grad_hidden = torch.empty_like(x) if need_hidden_grad else None
            # The weight gradient is accumulated in place in fp32: one (V, d) buffer for the whole call,
            # never a fresh fp32 copy per chunk.
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
            grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias_grad else None
            for start in range(0, x.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, t, ok = x[rows], targets[rows], valid[rows]
                logits = h @ w.t()  # (n, V) in the compute dtype
                logits = logits.to(acc) if logits.dtype != acc else logits
                if b is not None:
                    logits += b
                loss_sum, hits, grad, squares = _chunk_loss(logits, t, ok, softcap, need_grad, z_loss)
                total += loss_sum
                log_norm_squares += squares
                correct += hits
                if not need_grad:
                    del logits, grad
                    continue
                grad = grad.to(compute)  # (n, V): d(loss sum)/d(logits before the cap)
                if need_hidden_grad:
                    torch.mm(grad, w, out=grad_hidden[rows])
                if need_weight_grad:
                    if grad_weight.dtype == compute:
                        grad_weight.addmm_(grad.t(), h)
                    else:  # bf16 product added into the fp32 sum in place (CPU has no mixed-dtype addmm)
                        grad_weight.add_(grad.t() @ h)
                if need_bias_grad:
                    grad_bias += grad.sum(0, dtype=acc)
                del logits, grad  # free this chunk's (n, V) buffers before the next chunk allocates its own
        denominator = count.clamp(min=1).to(acc)
        z_term = z_loss * log_norm_squares / denominator
        loss = total / denominator if not z_loss else (total + z_loss * log_norm_squares) / denominator
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None), denominator)
        ctx.has = (need_hidden_grad, need_weight_grad, need_bias_grad)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct, z_term)  # z_term is a metric: its gradient is in `loss`'s
        return loss, correct, z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_z_term):
        saved = list(ctx.saved_tensors)
        denominator = saved.pop()
        scale = grad_loss / denominator
        grads = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            if not has:
                grads.append(None)
                continue
            g = saved.pop(0)
            # Scale in place when the buffer is already the parameter's dtype (no second (V, d) copy).
            grads.append(g.mul_(scale.to(g.dtype)) if g.dtype == dtype else (g * scale).to(dtype))
        return grads[0], grads[1], grads[2], None, None, None, None, None


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, ok: torch.Tensor, softcap: float | None,
                need_grad: bool, z_loss: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """For fp32 logits (n, V) of one chunk: summed cross-entropy over `ok` rows, how many targets are the
    argmax, (with need_grad) the gradient of the summed loss, cross-entropy + z_loss * log(Z)^2, with
    respect to the logits before the softcap, written into the logits' own buffer (softmax times
    (1 + 2 z_loss log Z) minus one-hot, times the cap's slope), and the sum of log(Z)^2 over `ok` rows
    (zero when z_loss is 0)."""
    cap_slope = None
    if softcap is not None:
        squashed = logits.div_(softcap).tanh_()  # in place: the chunk's one (n, V) buffer
        if need_grad:  # d(cap tanh(z/cap))/dz = 1 - tanh^2
            cap_slope = 1.0 - squashed * squashed
        logits = squashed.mul_(softcap)
    safe_t = torch.where(ok, targets, 0)
    target_logit = logits.gather(1, safe_t[:, None])[:, 0]
    # One exp pass, in place: the buffer of logits becomes the softmax, which is the gradient
    # (minus the one-hot target) that backward needs.
    # One pass gives the max and its first index (torch.argmax's tie-break): a target counts as correct
    # only if it is the token the model would emit, so tied logits (uniform ones) do not all score.
    row_max, predicted = logits.max(dim=-1, keepdim=True)
    hits = ((predicted[:, 0] == targets) & ok).sum()
    grad = logits.sub_(row_max).exp_()
    row_sum = grad.sum(dim=-1, keepdim=True)
    log_norm = (row_max + row_sum.log())[:, 0]
    loss_sum = torch.where(ok, log_norm - target_logit, 0.0).sum()
    squares = torch.where(ok, log_norm * log_norm, 0.0).sum() if z_loss else loss_sum.new_zeros(())
    if not need_grad:
        return loss_sum, hits, None, squares
    if z_loss:  # d(z log(Z)^2)/d(logits) = 2 z log(Z) softmax: the softmax row scaled, in the same pass
        grad.mul_((1.0 + 2.0 * z_loss * log_norm[:, None]) / row_sum)
    else:
        grad.div_(row_sum)
    grad[torch.arange(len(targets), device=targets.device), safe_t] -= 1.0
    grad.mul_(ok[:, None])
    if cap_slope is not None:
        grad.mul_(cap_slope)
    return loss_sum, hits, grad, squares


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, chunk_rows: int | None = None,
                         bias: torch.Tensor | None = None, with_correct: bool = False, z_loss: float = 0.0,
                         with_z_term: bool = False):
    """Mean cross-entropy of softmax(hidden @ weight.T + bias) against targets, ignoring IGNORE_INDEX.

    hidden (..., d), targets (...). Equal in value and gradient to
    F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100), with the matmuls in
    autocast's dtype when autocast is on (weight cast once per call) and softmax, sums and the weight
    gradient in fp32. `chunk_rows` rows of logits exist at a time (default: `default_chunk_rows`).
    With `with_correct`, also returns how many targets are the argmax (no extra pass over the vocabulary).
    `z_loss` > 0 adds z_loss * mean(logsumexp(logits)^2) over the scored rows to the loss (and its gradient);
    `with_z_term` returns (loss, correct, that term alone, detached).
    The gradients are formed in the forward pass and scaled in place by backward, so backward runs once
    per forward: a second one (retain_graph) is refused by autograd's in-place check, never wrong.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.device)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    loss, correct, z_term = _LinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk_rows,
                                                      torch.is_grad_enabled(), float(z_loss))
    if with_z_term:
        return loss, correct, z_term
    return (loss, correct) if with_correct else loss


def projection_cross_entropy(projection, targets: torch.Tensor, with_correct: bool = False,
                             chunk_rows: int | None = None, z_loss: float = 0.0, with_z_term: bool = False):
    """`linear_cross_entropy` of a model's `OutputProjection` (features, weight, bias, softcap)."""
    return linear_cross_entropy(projection.features, projection.weight, targets, softcap=projection.softcap,
                                chunk_rows=chunk_rows, bias=projection.bias, with_correct=with_correct,
                                z_loss=z_loss, with_z_term=with_z_term)


@dataclass(frozen=True)
class HeadLoss:
    """How training computes the output layer and its cross-entropy (`train.loss_kernel`,
    `train.loss_chunk_rows`); objectives call it with their projection and targets and get the mean
    loss and the number of targets that are the argmax.

    chunked: `linear_cross_entropy` above, any device. liger: Liger-Kernel's fused linear
    cross-entropy (Triton, CUDA only; `pip install liger-kernel`), for comparison on GPUs."""

    kernel: str = "chunked"
    chunk_rows: int | None = None

    def check(self, device: torch.device) -> None:
        """One line, before training starts, if the kernel cannot run here."""
        if self.kernel != "liger":
            return
        if device.type != "cuda":
            raise SlmforgeError(f"train.loss_kernel: 'liger' runs Triton kernels on CUDA only, not on {device.type}; "
                                f"use train.loss_kernel = \"chunked\"")
        if importlib.util.find_spec("liger_kernel") is None:
            raise SlmforgeError("train.loss_kernel: 'liger' needs the liger-kernel package (pip install liger-kernel)")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if "return_token_accuracy" not in inspect.signature(liger_fused_linear_cross_entropy).parameters:
            raise SlmforgeError("train.loss_kernel: this liger-kernel cannot report token accuracy "
                                "(return_token_accuracy); pip install -U liger-kernel")

    def __call__(self, projection, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct, _ = self.with_z_loss(projection, targets, 0.0)
        return loss, correct

    def with_z_loss(self, projection, targets: torch.Tensor, z_loss: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean cross-entropy plus z_loss * mean(log(Z)^2) (PaLM's z-loss), the number of targets
        that are the argmax, and the z term alone (detached, for the metrics)."""
        if self.kernel == "liger":
            return _liger_cross_entropy(projection, targets, z_loss)
        return projection_cross_entropy(projection, targets, chunk_rows=self.chunk_rows, z_loss=z_loss,
                                        with_z_term=True)


def _liger_cross_entropy(projection, targets: torch.Tensor, z_loss: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    features = projection.features.reshape(-1, projection.features.shape[-1])
    targets = targets.reshape(-1)
    # Liger's lse_square_scale is the same z-loss: z * lse^2 per scored row, in the loss and its gradient.
    out = liger_fused_linear_cross_entropy(features, projection.weight, targets, bias=projection.bias,
                                           ignore_index=IGNORE_INDEX, softcap=projection.softcap,
                                           lse_square_scale=z_loss, return_z_loss=bool(z_loss),
                                           return_token_accuracy=True)
    # Liger reports the accuracy over the scored targets; the objectives want the count.
    correct = out.token_accuracy.detach().float() * (targets != IGNORE_INDEX).sum()
    z_term = out.z_loss.detach() if z_loss else torch.zeros((), device=features.device)
    return out.loss, correct, z_term


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain version, for tests and for models whose logits are already at hand."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
