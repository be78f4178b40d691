"""Divergences between a student's and a teacher's next-token (or masked-token) distributions,
computed in chunks of rows: the logits of both models exist for `chunk_rows` rows at a time, never
for all (tokens x vocabulary) at once, which at a 250k vocabulary would be gigabytes.

    loss = mean over rows of D(p_teacher, q_student), with p = softmax(z / T)

forward_kl   KL(p || q) x T^2   (Hinton et al.: the T^2 keeps gradient sizes comparable across T)
reverse_kl   KL(q || p) x T^2   (mode-seeking)
js           Jensen-Shannon: (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2, x T^2
tv           total variation: sum |p - q| / 2 (bounded in [0, 1]; no T^2)

The teacher is constant: its logits are made inside the forward pass, and the student's gradient
(features, weight, bias) is computed chunk by chunk there too and kept for the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tv")


def row_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                   temperature: float) -> torch.Tensor:
    """(N,) divergence per row, from raw logits (N, V) of both models (float32)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    scale = temperature ** 2
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1) * scale
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1) * scale
    if kind == "js":
        p, q = log_p.exp(), log_q.exp()
        # log((p + q) / 2) from the logs: finite (with finite gradients) where both probabilities
        # underflow to 0, which a log of the sum is not.
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        return 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1)) * scale
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; one of {', '.join(DIVERGENCES)}")


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over row chunks of `chunk_loss(start, stop, student_logits)`, the student's logits made
    (and differentiated) one chunk at a time; the mean over rows is returned."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, student_cap, chunk_rows, need_grad):
        rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if need_grad and bias is not None else None)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            h = hidden[start:stop]
            raw = F.linear(h, weight, bias).float().detach().requires_grad_(need_grad)
            with torch.enable_grad() if need_grad else torch.no_grad():
                part = chunk_loss(start, stop, _softcap(raw, student_cap))
            total += part.detach()
            if need_grad:
                (grad_raw,) = torch.autograd.grad(part, raw)
                grad_hidden[start:stop] = (grad_raw.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad_raw.t(), h.float())
                if grad_bias is not None:
                    grad_bias += grad_raw.sum(0)
        count = max(rows, 1)
        if need_grad:
            ctx.save_for_backward(grad_hidden / count, (grad_weight / count).to(weight.dtype),
                                  (grad_bias / count).to(bias.dtype) if grad_bias is not None else None)
        ctx.has_bias = bias is not None
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_output, grad_weight * grad_output,
                grad_bias * grad_output if ctx.has_bias else None, None, None, None, None)


def _apply(student, chunk_loss, chunk_rows: int) -> torch.Tensor:
    hidden = student.features.reshape(-1, student.features.shape[-1])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or student.weight.requires_grad)
    return _ChunkedDivergence.apply(hidden, student.weight, student.bias, chunk_loss, student.softcap, chunk_rows,
                                    need_grad)


def chunked_divergence(student, teacher, kind: str = "forward_kl", temperature: float = 1.0,
                       chunk_rows: int = 1024, teacher_columns: torch.Tensor | None = None) -> torch.Tensor:
    """Mean divergence over rows between two `OutputProjection`s (student: features (N, d_s), weight
    (V, d_s); teacher: features (N, d_t), weight (V_t, d_t)). `teacher_columns` (V,) picks the teacher's
    vocabulary entries that are the student's tokens, in the student's order (a trimmed or remapped
    vocabulary): the teacher's distribution is then renormalized over those tokens."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; one of {', '.join(DIVERGENCES)}")
    t_weight, t_bias = teacher.weight, teacher.bias
    if teacher_columns is not None:
        t_weight = t_weight.index_select(0, teacher_columns)
        t_bias = t_bias.index_select(0, teacher_columns) if t_bias is not None else None
    if t_weight.shape[0] != student.weight.shape[0]:
        raise ValueError(f"the teacher scores {t_weight.shape[0]} tokens, the student {student.weight.shape[0]}")
    teacher_hidden = teacher.features.reshape(-1, teacher.features.shape[-1]).detach()
    t_weight, t_bias = t_weight.detach(), t_bias.detach() if t_bias is not None else None

    def chunk_loss(start: int, stop: int, student_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = _softcap(F.linear(teacher_hidden[start:stop], t_weight, t_bias).float(), teacher.softcap)
        return row_divergence(student_logits, teacher_logits, kind, float(temperature)).sum()

    return _apply(student, chunk_loss, chunk_rows)


def topk_forward_kl(student, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int = 1024) -> torch.Tensor:
    """Forward KL x T^2 against a teacher known by its top-k logits per row (an offline cache): the
    teacher's distribution is its softmax over those k tokens; the student's log-probabilities are
    those of its full softmax at the same tokens."""
    T = float(temperature)

    def chunk_loss(start: int, stop: int, student_logits: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(student_logits / T, dim=-1).gather(-1, teacher_ids[start:stop])
        log_p = F.log_softmax(teacher_logits[start:stop] / T, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum() * T * T

    return _apply(student, chunk_loss, chunk_rows)
