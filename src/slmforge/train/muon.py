"""torch.optim.Muon with the Newton-Schulz iterations of same-shape matrices run as one batched product.

torch's Muon orthogonalises one matrix at a time: 5 Newton-Schulz iterations of 3 small products each, per
matrix. A model's blocks repeat the same shapes (every layer's q, k, v, o, gate, up, down), so stacking the
matrices of one shape turns 7 x layers sequences of small products into 7 sequences of batched ones. The
arithmetic per matrix is unchanged (the same bf16 products, the same per-matrix norm), so the updates equal
torch's bit for bit on CPU (tests/test_batched_muon.py; a GPU's batched kernels may round differently),
and the state (one "momentum_buffer" per parameter) and param_groups are torch's, so a checkpoint written
with either loads into the other. Measured (benchmarks/bench_muon_step.py, 2 idle cores): 0.52x torch's
time per step on gemma3-tiny's matrices at 2 threads, 0.69x at 1; 0.97x on a ~10M model's, where the
products themselves dominate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def orthogonalize(updates: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Newton-Schulz orthogonalisation of a stack of same-shape matrices (n, rows, cols), each as torch's
    Muon does it alone: in bf16, on the wide orientation, scaled by its own Frobenius norm first."""
    a, b, c = coefficients
    alone = updates.size(0) == 1  # torch's 2-D products then: a batch of one takes another kernel, other bits
    x = (updates[0] if alone else updates).bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    multiply_add = torch.addmm if alone else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.mT if tall else x
    return x[None] if alone else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon lr for a matrix's shape (out, in): "original" (Keller Jordan) x sqrt(max(1, out/in));
    "match_rms_adamw" (Moonshot) x 0.2 sqrt(max(out, in))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


# torch < 2.9 has no Muon: the class still imports, and train/optim.py refuses optim.kind = "muon" there.
_MUON = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class BatchedMuon(_MUON):
    """torch.optim.Muon (same arguments, state and results) whose step orthogonalises the updates of all
    matrices of one shape, dtype and device together."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            momentum = group["momentum"]
            buckets: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon supports only dense real 2-D parameters")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                buckets.setdefault((p.shape, p.dtype, p.device), []).append((p, update))
            for (shape, _, _), members in buckets.items():
                ortho = orthogonalize(torch.stack([u for _, u in members]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                for (p, _), o in zip(members, ortho):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o, alpha=-step_lr)
        return loss
